#!/usr/bin/env python
"""``anchor-evaluate-diversity`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.evaluate_diversity`."""

import sys

from megatron_anchor.cli.evaluate_diversity import main

if __name__ == "__main__":
    sys.exit(main())
