#!/usr/bin/env python
"""``anchor-evaluate-diversity``: the tool lives in :mod:`megatron_anchor.cli.evaluate_diversity` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.evaluate_diversity import main

if __name__ == "__main__":
    sys.exit(main())
