#!/usr/bin/env python
"""``anchor-distill-annotator``: the tool lives in :mod:`megatron_anchor.cli.distill_annotator` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.distill_annotator import main

if __name__ == "__main__":
    sys.exit(main())
