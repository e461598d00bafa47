#!/usr/bin/env python
"""``anchor-evaluate-midtraining``: the tool lives in :mod:`megatron_anchor.cli.evaluate_midtraining` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.evaluate_midtraining import main

if __name__ == "__main__":
    sys.exit(main())
