#!/usr/bin/env python
"""``anchor-merge-datasets`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.merge_datasets`."""

import sys

from megatron_anchor.cli.merge_datasets import main

if __name__ == "__main__":
    sys.exit(main())
