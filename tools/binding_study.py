#!/usr/bin/env python
"""``anchor-binding-study`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.binding_study`."""

import sys

from megatron_anchor.cli.binding_study import main

if __name__ == "__main__":
    sys.exit(main())
