#!/usr/bin/env python
"""``anchor-inspect-dataset``: the tool lives in :mod:`megatron_anchor.cli.inspect_dataset` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.inspect_dataset import main

if __name__ == "__main__":
    sys.exit(main())
