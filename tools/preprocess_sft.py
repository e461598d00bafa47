#!/usr/bin/env python
"""``anchor-preprocess-sft``: the tool lives in :mod:`megatron_anchor.cli.preprocess_sft` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.preprocess_sft import main

if __name__ == "__main__":
    sys.exit(main())
