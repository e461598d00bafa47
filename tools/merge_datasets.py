#!/usr/bin/env python
"""``anchor-merge-datasets``: the tool lives in :mod:`megatron_anchor.cli.merge_datasets` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.merge_datasets import main

if __name__ == "__main__":
    sys.exit(main())
