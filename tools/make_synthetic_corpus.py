#!/usr/bin/env python
"""``anchor-make-synthetic-corpus``: the tool lives in :mod:`megatron_anchor.cli.make_synthetic_corpus` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.make_synthetic_corpus import main

if __name__ == "__main__":
    sys.exit(main())
