#!/usr/bin/env python
"""``anchor-evaluate-ability``: the tool lives in :mod:`megatron_anchor.cli.evaluate_ability` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.evaluate_ability import main

if __name__ == "__main__":
    sys.exit(main())
