#!/usr/bin/env python
"""``anchor-generate`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.generate`."""

import sys

from megatron_anchor.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
