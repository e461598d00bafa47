"""Real English text that ships with Python: the reference documentation's topics (``pydoc_data.topics``, ~465 KB
in 79 documents, ~2,500 blank-line chunks), for CPU examples that continue pretraining a real model on text it
should already know how to model. Deterministic; every tenth topic is held out. Also: labelled pairs of its chunks
for calibrating the distinct-class threshold of the diversity judge on documentation text."""

from __future__ import annotations

import json
import random
from typing import List, Tuple

from megatron_anchor.outputs import atomic_write

CHUNK_CHARS = (40, 800)
"""Blank-line chunks of this many characters are passages (shorter ones are headings and rules, longer ones
tables): what the SFT example trains on and what calibration pairs are drawn from."""


def pydoc_documents() -> List[Tuple[str, str]]:
    """``(topic name, text)`` of every pydoc topic, sorted by name."""
    from pydoc_data.topics import topics

    return sorted((name, text.strip() + "\n") for name, text in topics.items())


def write_pydoc_corpus(train_path: str, heldout_path: str, heldout_every: int = 10) -> Tuple[int, int]:
    """Write the topics as raw JSONL (``{"id", "text"}``), every ``heldout_every``-th to ``heldout_path``; returns
    the two document counts. Files are written under a temporary name and renamed."""
    docs = pydoc_documents()
    counts = [0, 0]
    for which, path in enumerate((train_path, heldout_path)):
        with atomic_write(path) as f:
            for i, (name, text) in enumerate(docs):
                if (i % heldout_every == heldout_every - 1) == bool(which):
                    f.write(json.dumps({"id": f"pydoc-{name}", "text": text}) + "\n")
                    counts[which] += 1
    return counts[0], counts[1]


def pydoc_passages(names=None) -> List[Tuple[str, str]]:
    """``(topic name, chunk)`` for every blank-line chunk of :data:`CHUNK_CHARS` characters, of the topics in
    ``names`` (all when None)."""
    lo, hi = CHUNK_CHARS
    return [(name, chunk) for name, text in pydoc_documents() if names is None or name in names
            for chunk in text.split("\n\n") if lo <= len(chunk) <= hi]


def write_pydoc_calibration_pairs(path: str, n: int = 1000, seed: int = 99) -> Tuple[int, int]:
    """``n`` pairs of passages of one topic (``"same": true``) and ``n`` of two topics (``false``) as JSONL
    ``{"a", "b", "same"}`` (tools/evaluate_diversity.py --calibration-pairs): one class of the distinct count is
    one documentation topic. The labels are the documentation's own structure, not any model's output. Written
    under a temporary name and renamed; returns the two counts."""
    rng = random.Random(seed)
    by_topic = {}
    for name, chunk in pydoc_passages():
        by_topic.setdefault(name, []).append(chunk)
    several = sorted(name for name, chunks in by_topic.items() if len(chunks) >= 2)
    names = sorted(by_topic)
    with atomic_write(path) as f:
        for _ in range(n):
            a, b = rng.sample(by_topic[rng.choice(several)], 2)
            f.write(json.dumps({"a": a, "b": b, "same": True}) + "\n")
        for _ in range(n):
            t, u = rng.sample(names, 2)
            f.write(json.dumps({"a": rng.choice(by_topic[t]), "b": rng.choice(by_topic[u]), "same": False}) + "\n")
    return n, n
