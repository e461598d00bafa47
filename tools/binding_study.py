#!/usr/bin/env python
"""``anchor-binding-study``: the tool lives in :mod:`megatron_anchor.cli.binding_study` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.binding_study import main

if __name__ == "__main__":
    sys.exit(main())
