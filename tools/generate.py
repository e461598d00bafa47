#!/usr/bin/env python
"""``anchor-generate``: the tool lives in :mod:`megatron_anchor.cli.generate` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
