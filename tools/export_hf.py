#!/usr/bin/env python
"""``anchor-export-hf``: the tool lives in :mod:`megatron_anchor.cli.export_hf` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
