#!/usr/bin/env python
"""``anchor-ablation-sft``: the tool lives in :mod:`megatron_anchor.cli.ablation_sft` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.ablation_sft import main

if __name__ == "__main__":
    sys.exit(main())
