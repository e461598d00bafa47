#!/usr/bin/env python
"""``anchor-run-on-ray``: the tool lives in :mod:`megatron_anchor.cli.run_on_ray` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.run_on_ray import main

if __name__ == "__main__":
    sys.exit(main())
