#!/usr/bin/env python
"""``anchor-annotate`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.annotate`."""

import sys

from megatron_anchor.cli.annotate import main

if __name__ == "__main__":
    sys.exit(main())
