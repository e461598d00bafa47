"""Checks of a study's own inputs, before any stage runs: every problem is a ValueError naming the file and line.

- a corpus: JSONL, one object per line with a non-empty string ``"text"`` (``"id"`` optional, else ``line-N``);
- an SFT file: JSONL of ``{"prompt", "response"}`` or ``{"messages": [...]}`` samples, as
  ``tools/preprocess_sft.py`` reads them (:func:`megatron_anchor.data.sft.parse_sample_line`);
- a prompts file: JSONL with ``"prompt"`` or ``"messages"`` per line, as ``tools/generate.py`` reads them
  (:func:`megatron_anchor.inference.prompts.read_prompts`); NoveltyBench's ``curated.jsonl`` works as it is.

Blank lines are skipped; a file with no entry is an error. Time and memory: one pass, the entries kept.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List


def _lines(path: str, what: str):
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path}: " + ("is a folder" if os.path.isdir(path) else "no such file"))
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", lineno, line


def read_corpus(path: str) -> List[Dict[str, str]]:
    """The corpus's documents ``{"id", "source", "text"}``; a line that is not an object with a non-empty string
    "text" is a ValueError naming ``file:line``."""
    docs, seen = [], set()
    for where, lineno, line in _lines(path, "corpus"):
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: invalid UTF-8 at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: malformed JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with a \"text\", got {type(obj).__name__}")
        text = obj.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: no \"text\" string (keys: {', '.join(sorted(obj)[:8]) or 'none'})")
        if not text.strip():
            raise ValueError(f"{where}: empty \"text\"")
        doc_id = str(obj.get("id", f"line-{lineno}"))
        if doc_id in seen:
            raise ValueError(f"{where}: duplicate id {doc_id!r}")
        seen.add(doc_id)
        docs.append({"id": doc_id, "source": str(obj.get("source", "corpus")), "text": text})
    if not docs:
        raise ValueError(f"corpus {path}: no documents (the file is empty)")
    return docs


def read_sft(path: str) -> List[dict]:
    """The SFT file's samples as JSON objects, each checked as SFT preprocessing checks it (a sample without a
    response is a ValueError naming ``file:line``)."""
    from megatron_anchor.data.sft import parse_sample_line

    samples = [parse_sample_line(line, where).raw for where, _, line in _lines(path, "SFT file")]
    if not samples:
        raise ValueError(f"SFT file {path}: no samples (the file is empty)")
    return samples


def read_prompt_objects(path: str) -> List[dict]:
    """The prompts file's lines as JSON objects, each checked as sampling checks it (an empty file, or a line
    without "prompt" or "messages", is a ValueError naming the file and line)."""
    from megatron_anchor.inference.prompts import read_prompts

    return [p.raw for p in read_prompts(path)]
