#!/usr/bin/env python
"""``anchor-import-hf``: the tool lives in :mod:`megatron_anchor.cli.import_hf` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.import_hf import main

if __name__ == "__main__":
    sys.exit(main())
