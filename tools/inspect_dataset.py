#!/usr/bin/env python
"""``anchor-inspect-dataset`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.inspect_dataset`."""

import sys

from megatron_anchor.cli.inspect_dataset import main

if __name__ == "__main__":
    sys.exit(main())
