#!/usr/bin/env python
"""``anchor-distill-annotator`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.distill_annotator`."""

import sys

from megatron_anchor.cli.distill_annotator import main

if __name__ == "__main__":
    sys.exit(main())
