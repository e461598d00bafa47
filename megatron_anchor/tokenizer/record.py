"""The tokenizer record: which tokenizer wrote a dataset or trained a checkpoint, and its special ids.

The data tools write ``PREFIX_tokenizer_record.json`` beside every dataset they write (``PREFIX`` is the token
dataset's path prefix, ``..._text_document``), and the trainer writes ``tokenizer_record.json`` into every
``--save`` directory. The trainer, generation and export read them and refuse a tokenizer whose ids differ: a
different model file, another end-of-document token (``--eod-token``), other delimiter ids or vocabulary size
would otherwise train or sample on ids that mean something else, silently.

A record is a few hundred bytes; building one hashes the tokenizer's model file once (a few MB, milliseconds).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

RECORD_VERSION = 1
DATASET_RECORD_SUFFIX = "_tokenizer_record.json"
"""Appended to a token dataset's path prefix: ``data/corpus_text_document_tokenizer_record.json``."""
CHECKPOINT_RECORD_FILE = "tokenizer_record.json"
"""The record's name inside a checkpoint (``--save``) directory."""

# Fields that decide which id a token gets; any difference makes data, checkpoint and run disagree.
ID_FIELDS = ("model_sha256", "vocab_size", "eod_id", "ann_open_id", "ann_close_id")


def dataset_record_path(prefix: str) -> str:
    """Where the record of the token dataset ``prefix`` lives."""
    return prefix + DATASET_RECORD_SUFFIX


def checkpoint_record_path(save_dir: str) -> str:
    """Where the record of the checkpoints under ``save_dir`` lives."""
    return os.path.join(save_dir, CHECKPOINT_RECORD_FILE)


def file_sha256(path: str) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_record(tokenizer, tokenizer_type: str, **extra) -> Dict[str, object]:
    """The record of ``tokenizer`` (an :class:`~megatron_anchor.tokenizer.AnchorTokenizer`).

    ``extra`` holds facts about the dataset that readers check too (``annotations``, ``packed``, ``seq_length``).
    """
    model_path = getattr(tokenizer, "model_path", None)
    record: Dict[str, object] = {
        "version": RECORD_VERSION,
        "tokenizer_type": tokenizer_type,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_model": os.path.abspath(model_path) if model_path else None,
        "model_sha256": file_sha256(model_path) if model_path and os.path.isfile(model_path) else None,
        "vocab_size": int(tokenizer.vocab_size),
        "eod_id": int(tokenizer.eod),
        "eod_text": tokenizer.eod_text,
        "ann_open_id": int(tokenizer.ann_open),
        "ann_close_id": int(tokenizer.ann_close),
    }
    record.update(extra)
    return record


def write_record(path: str, record: Dict[str, object]) -> None:
    """Write ``record`` as JSON under a temporary name, then rename (never a half-written record)."""
    from megatron_anchor.outputs import write_text

    write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_record(path: str) -> Optional[Dict[str, object]]:
    """The record at ``path``, or None when there is none; a corrupt file is an error naming it."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable tokenizer record ({exc}); rewrite the dataset or checkpoint") from None
    if not isinstance(record, dict) or "eod_id" not in record:
        raise ValueError(f"{path}: not a tokenizer record")
    return record


def record_mismatches(expected: Dict[str, object], actual: Dict[str, object]) -> List[str]:
    """Human-readable differences in the id-deciding fields (empty when the two tokenizers agree)."""
    problems = []
    for key in ID_FIELDS:
        a, b = expected.get(key), actual.get(key)
        if a is None or b is None:  # a record without a model hash (no model file) cannot be compared there
            continue
        if a != b:
            if key == "eod_id":
                problems.append(f"end-of-document id {a} ({expected.get('eod_text')!r}) vs {b} "
                                f"({actual.get('eod_text')!r}): pass --eod-token {expected.get('eod_text')!r}")
            elif key == "model_sha256":
                problems.append(f"tokenizer model {expected.get('tokenizer_model')} (sha256 {str(a)[:12]}) vs "
                                f"{actual.get('tokenizer_model')} (sha256 {str(b)[:12]})")
            else:
                problems.append(f"{key} {a} vs {b}")
    return problems


def merge_records(records: List[Optional[Dict[str, object]]], what: str) -> Optional[Dict[str, object]]:
    """The record of datasets merged in order: None if any part has none; an error if their ids differ."""
    if not records or any(r is None for r in records):
        return None
    first = records[0]
    for other in records[1:]:
        problems = record_mismatches(first, other)
        if problems:
            raise ValueError(f"{what}: the parts were written with different tokenizers: " + "; ".join(problems))
    merged = dict(first)
    merged["packed"] = any(bool(r.get("packed")) for r in records)
    merged["annotations"] = any(bool(r.get("annotations")) for r in records)
    return merged
