"""Command-line pieces shared by the dataset-writing tools (tools/preprocess_data.py, tools/preprocess_sft.py)."""

from __future__ import annotations

import argparse

from megatron_anchor.bounds import argument
from megatron_anchor.data.preprocess import PreprocessConfig
from megatron_anchor.tokenizer import TOKENIZER_TYPES
from megatron_anchor.tokenizer.fast import BACKENDS, INSTALL_HINT


def add_tokenizer_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--tokenizer-type``, ``--tokenizer-model`` and ``--eod-token``; returns the group for more flags."""
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES),
                   help="tokenizer kind (Megatron-LM names); the annotation delimiters are special tokens")
    g.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file, or a Hugging Face tokenizer.json or folder holding one")
    g.add_argument("--eod-token", default=None,
                   help="end-of-document token text (default: the SentencePiece model's eos piece, or the Hugging "
                        "Face tokenizer's eos_token); recorded beside the dataset, and the trainer must be given "
                        "the same --eod-token")
    g.add_argument("--tokenizer-backend", choices=BACKENDS, default="auto",
                   help="what encodes text: 'auto' uses gigatoken (" + INSTALL_HINT + ") when it is installed and "
                        "gives the reference tokenizer's ids on probes and a sample of this input, else the "
                        "reference (one line says which and why); 'gigatoken' stops when it cannot be used; "
                        "'reference' never uses it. The output is the same either way (default: auto)")
    return g


def add_output_arguments(p: argparse.ArgumentParser, shard_note: str = "") -> argparse._ArgumentGroup:
    """``--output-prefix``, ``--overwrite``, ``--num-shards`` and ``--shard-index``."""
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True,
                   help="path prefix of the outputs: PREFIX_text_document.{bin,idx} and _roles beside them")
    g.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs / discard unfinished parts of a run with other arguments")
    g.add_argument("--num-shards", **argument(
        PreprocessConfig, "num_shards",
        "split the input into N shards by byte range (shard i owns the lines starting in bytes [i*size/N, "
        "(i+1)*size/N)); each run writes PREFIX_text_document.shardIIIII-of-NNNNN plus a .done marker; merge the "
        "shards with tools/merge_datasets.py" + shard_note))
    g.add_argument("--shard-index", **argument(
        PreprocessConfig, "shard_index",
        "which shard this run processes (0-based, below --num-shards); a rerun skips a completed shard and resumes "
        "a half-written one"))
    return g


def add_runtime_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--workers``, ``--docs-per-part`` and ``--no-progress``."""
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", **argument(PreprocessConfig, "workers", "tokenizing worker processes"))
    g.add_argument("--docs-per-part", **argument(
        PreprocessConfig, "docs_per_part", "input lines per part, the unit of parallel work and of resumption (a "
                                           "killed run restarted with the same arguments skips finished parts)"))
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return g
