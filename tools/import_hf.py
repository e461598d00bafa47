#!/usr/bin/env python
"""``anchor-import-hf`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.import_hf`."""

import sys

from megatron_anchor.cli.import_hf import main

if __name__ == "__main__":
    sys.exit(main())
