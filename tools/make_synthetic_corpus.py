#!/usr/bin/env python
"""``anchor-make-synthetic-corpus`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.make_synthetic_corpus`."""

import sys

from megatron_anchor.cli.make_synthetic_corpus import main

if __name__ == "__main__":
    sys.exit(main())
