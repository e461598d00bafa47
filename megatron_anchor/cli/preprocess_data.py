#!/usr/bin/env python
"""Preprocess annotated (or raw) JSONL into Megatron indexed datasets with a per-token role channel.

Writes ``PREFIX_text_document.{bin,idx}`` (readable by stock megatron-core ``IndexedDataset``) and
``PREFIX_text_document_roles.{bin,idx}`` (uint8 role per token). Example::

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod --workers 8
"""

import argparse
import logging
import sys

from megatron_anchor.annotation.budget import add_budget_arguments, budget_from_args
from megatron_anchor.annotation.schema import DocumentError
from megatron_anchor.bounds import argument, fields_from_args
from megatron_anchor.data.cli import add_output_arguments, add_runtime_arguments, add_tokenizer_arguments
from megatron_anchor.data.preprocess import PreprocessConfig, run
from megatron_anchor.tokenizer import TokenizerError
from megatron_anchor.tokenizer.fast import FastBackendError


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="JSONL file (or .jsonl.gz): annotated documents ({'chunks': [...]}) or raw ones "
                        "({'text': ...}); see docs/data_formats.md")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="key of a raw document's text; also names the output (PREFIX_<key>_document). "
                        "One key is supported (default: text)")
    g.add_argument("--no-annotations", action="store_true",
                   help="write the same text without annotations (the plain-pretraining baseline); "
                        "roles are then TEXT and EOD only")
    g.add_argument("--annotator", choices=["default", "none"], default="default",
                   help="how raw documents are annotated: 'default' uses the embedded offline annotator; "
                        "'none' makes raw documents an error (annotate them first with tools/annotate.py)")
    g.add_argument("--skip-bad-documents", action="store_true",
                   help="skip bad documents (malformed JSON, invalid UTF-8, empty, bad tags, over-long chunks) "
                        "and count them in the summary, instead of stopping at the first with its file:line")
    g.add_argument("--max-chunk-tokens", **argument(
        PreprocessConfig, "max_chunk_tokens",
        "reject documents with a run of text between annotations longer than this many tokens, e.g. your "
        "--seq-length (0: no limit). Not with --no-annotations, where a document is one run"))

    g = p.add_argument_group("annotation budget (raw documents annotated here; see docs/data_formats.md)")
    add_budget_arguments(g)

    g = add_tokenizer_arguments(p)
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")

    add_output_arguments(p)

    add_runtime_arguments(p)
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(args.json_keys) != 1:
        print("error: exactly one --json-keys value is supported", file=sys.stderr)
        return 2
    if args.max_chunk_tokens and args.no_annotations:
        print("error: --max-chunk-tokens limits the runs of text between annotations; with --no-annotations "
              "each document is encoded whole, so drop one of the two", file=sys.stderr)
        return 2
    try:
        budget = budget_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The flags that set a PreprocessConfig field carry its name (their dest); the rest are mapped here.
    cfg = PreprocessConfig(**{**fields_from_args(PreprocessConfig, args), "json_key": args.json_keys[0],
                              "annotations": not args.no_annotations, "show_progress": not args.no_progress,
                              "budget": budget})
    try:
        run(cfg)
    except (DocumentError, TokenizerError, FastBackendError) as e:
        print(f"error: {e}\n(finished parts are kept: fix the input, or pass --skip-bad-documents, and rerun "
              "the same command to resume)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
