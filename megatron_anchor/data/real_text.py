"""Real English text that ships with Python: the reference documentation's topics (``pydoc_data.topics``, ~465 KB
in 79 documents, ~2,500 blank-line chunks), for CPU examples that continue pretraining a real model on text it
should already know how to model. Deterministic; every tenth topic is held out."""

from __future__ import annotations

import json
import os
from typing import List, Tuple


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
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i, (name, text) in enumerate(docs):
                if (i % heldout_every == heldout_every - 1) == bool(which):
                    f.write(json.dumps({"id": f"pydoc-{name}", "text": text}) + "\n")
                    counts[which] += 1
        os.replace(tmp, path)
    return counts[0], counts[1]
