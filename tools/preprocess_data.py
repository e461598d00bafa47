#!/usr/bin/env python
"""``anchor-preprocess-data``: the tool lives in :mod:`megatron_anchor.cli.preprocess_data` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
