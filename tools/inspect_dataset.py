#!/usr/bin/env python
"""Validate a token dataset and its role channel, print statistics, and render documents with their roles.

Checks both .bin/.idx pairs (headers, sizes against the index, uint8 roles, equal sequence lengths and
document indices, known role codes) and exits 1 with the reason when anything is off. Example::

    python tools/inspect_dataset.py --input data/corpus_text_document \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --document 0
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_anchor.data.indexed import DatasetFormatError  # noqa: E402
from megatron_anchor.data.inspect import dataset_stats, render_document  # noqa: E402
from megatron_anchor.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="token dataset path prefix (PREFIX_text_document, without .bin/.idx); the role channel "
                        "is read from PREFIX_text_document_roles")
    p.add_argument("--document", type=int, action="append", default=[],
                   help="render this document (0-based) as role runs; repeatable")
    p.add_argument("--max-runs", type=int, default=40, help="at most this many role runs per rendered document")
    p.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_TYPES), help="decode rendered tokens to text")
    p.add_argument("--tokenizer-model", help="tokenizer model for --tokenizer-type")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        stats = dataset_stats(args.input)
    except DatasetFormatError as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    print(f"OK: {args.input} and its role channel are consistent")
    print("\n".join(stats.lines()))
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model) if args.tokenizer_type else None
    for d in args.document:
        try:
            print("\n".join(render_document(args.input, d, tok, args.max_runs)))
        except IndexError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
