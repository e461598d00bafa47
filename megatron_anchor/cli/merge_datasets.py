#!/usr/bin/env python
"""Merge token datasets (e.g. shards) into one, keeping each role channel aligned with its tokens.

Inputs are concatenated in the order given (or, with a folder, in file-name order), streaming, and written
under temporary names that are renamed when complete. Example::

    python tools/merge_datasets.py --input shards/ --output-prefix data/corpus_text_document
"""

import argparse
import glob
import os
import sys

from megatron_anchor.data.indexed import ROLES_SUFFIX, merge_token_role_datasets


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="token dataset prefixes (without .bin/.idx) in merge order, or one folder: every "
                        "*.idx in it that has a _roles sibling, sorted by name")
    p.add_argument("--output-prefix", required=True,
                   help="output token dataset prefix; the role channel goes to OUTPUT_PREFIX_roles")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def resolve_inputs(inputs) -> list:
    """Expand a single folder into its dataset prefixes (role channels excluded), sorted by name."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        prefixes = sorted(p[: -len(".idx")] for p in glob.glob(os.path.join(inputs[0], "*.idx")))
        return [p for p in prefixes if not p.endswith(ROLES_SUFFIX)]
    return list(inputs)


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    prefixes = resolve_inputs(args.input)
    if not prefixes:
        print(f"error: no datasets found in {args.input}", file=sys.stderr)
        return 1
    out = args.output_prefix
    if not args.overwrite and any(os.path.exists(out + ext) for ext in (".bin", ".idx")):
        print(f"error: {out}.bin/.idx exist; pass --overwrite to replace them", file=sys.stderr)
        return 1
    try:
        h = merge_token_role_datasets(prefixes, out)
    except ValueError as e:  # DatasetFormatError, OutputError, parts written with different tokenizers
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets into {out} ({h.document_count:,} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
