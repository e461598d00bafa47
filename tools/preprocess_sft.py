#!/usr/bin/env python
"""``anchor-preprocess-sft`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.preprocess_sft`."""

import sys

from megatron_anchor.cli.preprocess_sft import main

if __name__ == "__main__":
    sys.exit(main())
