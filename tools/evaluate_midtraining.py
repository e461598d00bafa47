#!/usr/bin/env python
"""``anchor-evaluate-midtraining`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.evaluate_midtraining`."""

import sys

from megatron_anchor.cli.evaluate_midtraining import main

if __name__ == "__main__":
    sys.exit(main())
