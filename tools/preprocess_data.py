#!/usr/bin/env python
"""``anchor-preprocess-data`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.preprocess_data`."""

import sys

from megatron_anchor.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
