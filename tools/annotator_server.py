#!/usr/bin/env python
"""``anchor-annotator-server`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.annotator_server`."""

import sys

from megatron_anchor.cli.annotator_server import main

if __name__ == "__main__":
    sys.exit(main())
