#!/usr/bin/env python
"""``anchor-annotator-server``: the tool lives in :mod:`megatron_anchor.cli.annotator_server` (``--help`` describes it)."""

import sys

from megatron_anchor.cli.annotator_server import main

if __name__ == "__main__":
    sys.exit(main())
