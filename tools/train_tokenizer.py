#!/usr/bin/env python
"""Train a small tokenizer from a JSONL corpus, with the annotation delimiters as special tokens.

SentencePiece (default) writes PREFIX.model: lossless (identity normalisation, no dummy prefix, byte fallback),
delimiters as control symbols, eos as end-of-document. ``--type hf`` writes a byte-level BPE folder
(PREFIX/tokenizer.json) with ``<|endoftext|>`` and the delimiters as special tokens. Example::

    python tools/train_tokenizer.py --input corpus.jsonl --output-prefix tok/anchor --vocab-size 8000
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_anchor.annotation.chunking import split_chunks  # noqa: E402
from megatron_anchor.tokenizer.train import iter_jsonl_texts, train_hf_bpe, train_sentencepiece  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL corpus (raw {'text': ...} or annotated {'chunks': ...})")
    p.add_argument("--output-prefix", required=True,
                   help="SentencePiece: writes PREFIX.model; hf: writes the folder PREFIX/")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size, special tokens included")
    p.add_argument("--type", choices=["sentencepiece", "hf"], default="sentencepiece", help="tokenizer kind")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="SentencePiece algorithm")
    p.add_argument("--json-key", default="text", help="key of a raw document's text")
    p.add_argument("--max-bytes", type=int, default=50_000_000,
                   help="train on at most this many bytes of the corpus (0: all)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.path.isfile(args.input):
        print(f"error: input {args.input!r} not found", file=sys.stderr)
        return 1
    texts = iter_jsonl_texts(args.input, args.json_key, args.max_bytes)
    if args.type == "sentencepiece":
        # SentencePiece trains on "sentences": feed chunks (with their separators, so newlines are learned).
        chunks = (t + s for doc in texts for t, s in split_chunks(doc))
        out = train_sentencepiece(chunks, args.output_prefix, args.vocab_size, args.model_type)
    else:
        out = train_hf_bpe(texts, args.output_prefix, args.vocab_size)
    logging.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
