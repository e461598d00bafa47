#!/usr/bin/env python
"""``anchor-run-on-ray`` as a script, for Megatron-LM habits: the tool is
:mod:`megatron_anchor.cli.run_on_ray`."""

import sys

from megatron_anchor.cli.run_on_ray import main

if __name__ == "__main__":
    sys.exit(main())
