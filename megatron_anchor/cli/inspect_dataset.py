#!/usr/bin/env python
"""Validate a token dataset and its role channel, print statistics, and render documents with their roles.

Checks both .bin/.idx pairs (headers, sizes against the index, uint8 roles, equal sequence lengths and
document indices, known role codes) and exits 1 with the reason when anything is off. Example::

    python tools/inspect_dataset.py --input data/corpus_text_document \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --document 0
"""

import argparse
import sys

from megatron_anchor.data.indexed import DatasetFormatError
from megatron_anchor.data.dataset_report import dataset_stats, render_document
from megatron_anchor.bounds import ranged
from megatron_anchor.tokenizer import TOKENIZER_TYPES, TokenizerError, build_tokenizer


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="token dataset path prefix (PREFIX_text_document, without .bin/.idx); the role channel "
                        "is read from PREFIX_text_document_roles")
    p.add_argument("--document", action="append", default=[],
                   **ranged(int, "render this document (0-based) as role runs; repeatable", ge=0))
    p.add_argument("--max-runs", default=40, **ranged(int, "at most this many role runs per rendered document", ge=1))
    p.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_TYPES), help="decode rendered tokens to text")
    p.add_argument("--tokenizer-model", help="tokenizer model for --tokenizer-type; it must be the one that wrote "
                                             "the dataset (checked against the dataset's tokenizer record)")
    p.add_argument("--eod-token", default=None, help="end-of-document token text the dataset was written with "
                                                     "(default: the tokenizer's own)")
    return p


def checked_tokenizer(args):
    """The tokenizer the flags name, refused (ValueError) when the dataset's tokenizer record shows that another
    one wrote it: its ids would render as other text, silently."""
    from megatron_anchor.tokenizer.record import dataset_record_path, read_record, record_mismatches, \
        tokenizer_record

    if not args.tokenizer_model:
        raise ValueError("--tokenizer-type needs --tokenizer-model")
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, eod_token=args.eod_token)
    path = dataset_record_path(args.input)
    saved = read_record(path)
    if saved is None:
        print(f"note: {path} not found: the tokenizer cannot be checked against the one that wrote the data",
              file=sys.stderr)
        return tok
    problems = record_mismatches(saved, tokenizer_record(tok, args.tokenizer_type))
    if problems:
        raise ValueError(f"{args.input} was written with another tokenizer ({path}): " + "; ".join(problems))
    return tok


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        stats = dataset_stats(args.input)
    except DatasetFormatError as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    print(f"OK: {args.input} and its role channel are consistent")
    print("\n".join(stats.lines()))
    tok = None
    if args.tokenizer_type:
        try:
            tok = checked_tokenizer(args)
        except (TokenizerError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for d in args.document:
        try:
            print("\n".join(render_document(args.input, d, tok, args.max_runs)))
        except IndexError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
