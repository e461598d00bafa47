#!/usr/bin/env python
"""``anchor-evaluate-ability`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.evaluate_ability`."""

import sys

from megatron_anchor.cli.evaluate_ability import main

if __name__ == "__main__":
    sys.exit(main())
