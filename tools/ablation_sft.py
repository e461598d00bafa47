#!/usr/bin/env python
"""``anchor-ablation-sft`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.ablation_sft`."""

import sys

from megatron_anchor.cli.ablation_sft import main

if __name__ == "__main__":
    sys.exit(main())
