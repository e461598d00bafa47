#!/usr/bin/env python
"""``anchor-train-tokenizer``: the tool lives in :mod:`megatron_anchor.cli.train_tokenizer` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
