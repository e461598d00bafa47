#!/usr/bin/env python
"""Train a small tokenizer from a JSONL corpus, with the annotation delimiters as special tokens.

SentencePiece (default) writes PREFIX.model: lossless (identity normalisation, no dummy prefix, byte fallback),
delimiters as control symbols, eos as end-of-document. ``--type hf`` writes a byte-level BPE folder
(PREFIX/tokenizer.json) with ``<|endoftext|>`` and the delimiters as special tokens. Example::

    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix tok/anchor --vocab-size 8000

Exit status: 0, 1 for bad input (an empty corpus, a bad line, a vocabulary the corpus cannot have), 2 for bad flags.
"""

import argparse
import logging
import sys

from megatron_anchor.bounds import argument
from megatron_anchor.outputs import OutputError, check_outputs, require_input
from megatron_anchor.tokenizer.train import (
    TokenizerTrainConfig,
    TokenizerTrainingError,
    train_tokenizer,
)


def get_parser() -> argparse.ArgumentParser:
    c = TokenizerTrainConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL corpus (raw {'text': ...} or annotated {'chunks': ...})")
    p.add_argument("--output-prefix", required=True,
                   help="SentencePiece: writes PREFIX.model; hf: writes the folder PREFIX/")
    p.add_argument("--vocab-size", **argument(c, "vocab_size", "vocabulary size, special tokens included; a corpus "
                                                               "too small for it gives fewer (reported)"))
    p.add_argument("--type", choices=["sentencepiece", "hf"], default="sentencepiece", help="tokenizer kind")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece algorithm")
    p.add_argument("--json-key", default="text", help="key of a raw document's text")
    p.add_argument("--max-bytes", **argument(c, "max_bytes", "train on at most this many bytes of the corpus (0: all)"))
    p.add_argument("--skip-bad-documents", action="store_true",
                   help="skip and count lines that are not documents, instead of stopping at the first (the error "
                        "names file and line)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = TokenizerTrainConfig(input=args.input, output_prefix=args.output_prefix, vocab_size=args.vocab_size,
                               type=args.type, model_type=args.model_type, json_key=args.json_key,
                               max_bytes=args.max_bytes, skip_bad_documents=args.skip_bad_documents)
    try:
        require_input(args.input, "--input")
        check_outputs([("--output-prefix", path) for path in cfg.outputs()], [("--input", args.input)])
        out, size = train_tokenizer(cfg)
    except (FileNotFoundError, OutputError, TokenizerTrainingError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 1
    if cfg.skipped:
        logging.warning("skipped %d bad lines, the first: %s", len(cfg.skipped), cfg.skipped[0])
    if size < args.vocab_size:
        logging.warning("the vocabulary has %d tokens, not the %d asked: the corpus supports no more (give it more "
                        "text, or a smaller --vocab-size)", size, args.vocab_size)
    logging.info("wrote %s (vocabulary %d)", out, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
