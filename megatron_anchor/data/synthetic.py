"""A small synthetic corpus generator: raw documents whose paragraphs span many topics and genres.

Used by the tests, the benchmarks and the quickstart so that everything runs offline on an embedded default.
Deterministic for a given seed. Documents have 2-7 paragraphs separated by blank lines; a document keeps its
topic from one paragraph to the next with probability ``persistence``.
"""

from __future__ import annotations

import json
import random
from typing import Dict, Iterator, List

TOPICS: Dict[str, List[str]] = {
    "cooking": "recipe oven flour butter garlic sauce soup kitchen chef dinner spice bread".split(),
    "sports": "team player match score goal season coach league championship ball race".split(),
    "science": "experiment theory physics chemistry molecule atom cell energy laboratory particle".split(),
    "technology": "computer software program network device algorithm server chip phone internet".split(),
    "health": "doctor patient disease hospital medicine treatment symptom vaccine therapy clinic".split(),
    "politics": "government election vote minister law policy parliament senate campaign court".split(),
    "business": "company market customer profit revenue investor stock bank economy trade".split(),
    "travel": "trip journey hotel flight beach island tourist museum train map".split(),
    "nature": "forest river mountain animal bird ocean lake weather flower garden".split(),
    "history": "war king queen empire century ancient castle battle army revolution".split(),
    "music": "song band album guitar piano concert singer melody rhythm orchestra".split(),
    "space": "planet star moon orbit rocket galaxy astronaut telescope universe comet".split(),
}
NAMES = "Alice Bruno Chen Dara Elena Farid Greta Hiro Ines Jonas Kofi Lena Mateo Nadia Omar Priya".split()
PLACES = "Lyon Oslo Nairobi Lima Kyoto Quebec Tunis Perth Bergen Porto Dakar Hanoi".split()
VERBS = "studied described visited built found measured improved watched planned discussed".split()
FILLER = "the a of and in with for about near after before during while".split()

_TEMPLATES = {
    "narrative": "{name} {verb} the {w1} in {place}. Later {name} saw a {w2} and a {w3} with the {w4}.",
    "exposition": "A {w1} is related to the {w2}. In {place}, the {w3} {verb} every {w4} of the region.",
    "question": "Why did {name} choose the {w1} over the {w2} in {place}? Was the {w3} really better?",
    "dialogue": '"Where is the {w1}?" asked {name}. "Near the {w2} in {place}," said the {w3} expert.',
    "list": "Things about the {w1}:\n- the {w2} of {place}\n- a {w3} that {name} {verb}\n- every {w4}",
}


def _sentence(rng: random.Random, topic: str, genre: str) -> str:
    words = TOPICS[topic]
    return _TEMPLATES[genre].format(
        name=rng.choice(NAMES), place=rng.choice(PLACES), verb=rng.choice(VERBS),
        w1=rng.choice(words), w2=rng.choice(words), w3=rng.choice(words), w4=rng.choice(words),
    )


def generate_document(rng: random.Random, persistence: float = 0.7) -> str:
    """One raw document: paragraphs separated by blank lines."""
    topic = rng.choice(sorted(TOPICS))
    paragraphs = []
    for _ in range(rng.randint(2, 7)):
        if rng.random() > persistence:
            topic = rng.choice(sorted(TOPICS))
        genre = rng.choice(sorted(_TEMPLATES))
        n = rng.randint(1, 4) if genre != "list" else 1
        paragraphs.append(" ".join(_sentence(rng, topic, genre) for _ in range(n)))
    return "\n\n".join(paragraphs)


def generate_documents(n: int, seed: int = 0) -> Iterator[str]:
    """``n`` raw documents, deterministic for ``seed``."""
    rng = random.Random(seed)
    for _ in range(n):
        yield generate_document(rng)


def write_raw_jsonl(path: str, n: int, seed: int = 0) -> int:
    """Write ``n`` raw documents as ``{"id", "text"}`` JSONL; returns bytes written."""
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(generate_documents(n, seed)):
            line = json.dumps({"id": f"doc-{i}", "text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
    return size
