#!/usr/bin/env python
"""``anchor-annotate``: the tool lives in :mod:`megatron_anchor.cli.annotate` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.annotate import main

if __name__ == "__main__":
    sys.exit(main())
