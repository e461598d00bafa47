#!/usr/bin/env python
"""``anchor-train-tokenizer`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.train_tokenizer`."""

import sys

from megatron_anchor.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
