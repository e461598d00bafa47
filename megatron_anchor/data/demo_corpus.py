"""The quickstart's designed corpus: pretraining chunks that span many topics, SFT responses that cover few.

The method's effect only shows when the data has the shape real data has (see docs and the quickstart):

- **Pretraining** documents are chunks (separated by blank lines) drawn from 16 topics, 5 genres and a pool of
  names and places, with a new topic for most chunks, so the annotation that follows any chunk has a broad,
  high-entropy distribution. A share of documents (``instruction_share``) opens with an instruction such as
  "Write a short paragraph." followed by ordinary chunks: the SFT wrapper is then familiar text to the base
  model, which the anchored model needs to learn the SFT format without overriding the annotation.
- **SFT** samples pair an instruction with one chunk from a *narrow* slice of that world (3 topics, 2 genres,
  3 names, 3 places), as instruction data is narrow compared with pretraining data.
- **Held-out prompts** are instruction phrasings never used in SFT.

Every topic word is a cue word of the embedded annotator's lexicon
(:mod:`megatron_anchor.annotation.default_annotator`), so the tags extracted from a generated response name
the topic the response is about; template words are chosen to be no cue word at all. Deterministic per seed.
"""

from __future__ import annotations

import json
import random
from typing import Dict, Iterator, List, Sequence

# Cue words of each annotator topic (a chunk uses three of its topic's words and none of another's).
TOPICS: Dict[str, List[str]] = {
    "cooking": "recipe oven flour sugar butter garlic onion sauce soup kitchen chef meal".split(),
    "sports": "team player match score goal season coach league championship ball football tennis".split(),
    "science": "experiment theory physics chemistry biology molecule atom cell laboratory hypothesis".split(),
    "technology": "computer software hardware program internet network device algorithm server chip".split(),
    "health": "doctor patient disease hospital medicine treatment symptom virus vaccine therapy".split(),
    "politics": "government election vote president minister law policy parliament senate campaign".split(),
    "business": "company market sales price customer profit revenue investor stock bank".split(),
    "travel": "trip journey hotel flight beach island tourist road train map".split(),
    "nature": "forest river mountain tree animal bird ocean lake flower garden".split(),
    "history": "war king queen empire century castle battle army revolution kingdom".split(),
    "music": "song band album guitar piano concert singer melody rhythm orchestra".split(),
    "education": "school student teacher lesson university exam course".split(),
    "family": "mother father child daughter son brother sister parents baby".split(),
    "space": "planet moon orbit rocket galaxy astronaut telescope universe".split(),
    "art": "artist painting gallery sculpture canvas drawing".split(),
    "crime": "police thief murder detective arrest prison robbery".split(),
}
NAMES = "Alice Bruno Chen Dara Elena Farid Greta Hiro Ines Jonas Kofi Lena Mateo Nadia Omar Priya".split()
PLACES = "Lyon Oslo Nairobi Lima Kyoto Quebec Tunis Perth Bergen Porto Dakar Hanoi".split()

# One sentence per genre; each is recognised as that genre by the embedded annotator.
TEMPLATES: Dict[str, str] = {
    "narrative": "{name} went to {place} once and said the {w1} was near the {w2} and the {w3}.",
    "exposition": "In {place} the {w1} depends on the {w2}, and {name} links the {w3} to both.",
    "question": "Why does {name} in {place} prefer the {w1} to the {w2} and the {w3}?",
    "dialogue": '"Is the {w1} near the {w2}?" asked {name} in {place}. "Only the {w3}," came the reply.',
    "list": "Notes from {place}:\n- the {w1}\n- the {w2} that {name} likes\n- the {w3}",
}

# Instructions: none contains a topic cue word. The first ones are used in SFT, the last ones held out.
SFT_PROMPTS = [
    "Write a short paragraph.", "Tell me something interesting.", "Give me a few sentences.",
    "Describe something for me.", "Write a few lines.", "Say something new.", "Share a short passage.",
    "Compose a brief note.", "Produce a short piece of writing.", "Write anything you like.",
    "Give me a short passage.", "Tell me a little tale.",
]
HELDOUT_PROMPTS = [
    "Please write a paragraph.", "Could you tell me something?", "Write me a brief piece.",
    "Offer a few sentences.", "Jot down a short note.", "Say a few words.", "Share something with me.",
    "Now write some lines.",
]

# The narrow slice SFT responses are drawn from.
SFT_TOPICS = ("cooking", "travel", "music")
SFT_GENRES = ("exposition", "narrative")
SFT_NAMES = ("Alice", "Bruno", "Chen")
SFT_PLACES = ("Lyon", "Oslo", "Lima")


def chunk(rng: random.Random, topic: str, genre: str, names: Sequence[str] = NAMES,
          places: Sequence[str] = PLACES) -> str:
    """One chunk (a single sentence) about ``topic`` in ``genre``."""
    w1, w2, w3 = rng.sample(TOPICS[topic], 3)
    return TEMPLATES[genre].format(name=rng.choice(names), place=rng.choice(places), w1=w1, w2=w2, w3=w3)


def pretraining_document(rng: random.Random, instruction_share: float = 0.1, persistence: float = 0.2) -> str:
    """2-6 chunks, the topic kept from one chunk to the next only with probability ``persistence``; with
    probability ``instruction_share`` the document opens with an instruction (any of them, held-out ones too:
    they are ordinary text in pretraining, what is held out is their use in SFT)."""
    topics, genres = sorted(TOPICS), sorted(TEMPLATES)
    parts = []
    if rng.random() < instruction_share:
        parts.append(rng.choice(SFT_PROMPTS + HELDOUT_PROMPTS))
    topic = rng.choice(topics)
    for _ in range(rng.randint(2, 6)):
        if rng.random() > persistence:
            topic = rng.choice(topics)
        parts.append(chunk(rng, topic, rng.choice(genres)))
    return "\n\n".join(parts)


def sft_sample(rng: random.Random) -> Dict[str, str]:
    """One ``{"prompt", "response"}`` sample from the narrow SFT slice."""
    response = chunk(rng, rng.choice(SFT_TOPICS), rng.choice(SFT_GENRES), SFT_NAMES, SFT_PLACES)
    return {"prompt": rng.choice(SFT_PROMPTS), "response": response}


def pretraining_documents(n: int, seed: int = 0, instruction_share: float = 0.1) -> Iterator[str]:
    """``n`` pretraining documents, deterministic for ``seed``."""
    rng = random.Random(seed)
    for _ in range(n):
        yield pretraining_document(rng, instruction_share)


def write_demo_corpus(out_dir: str, documents: int, sft_samples: int, seed: int = 0,
                      instruction_share: float = 0.1) -> Dict[str, str]:
    """Write ``raw.jsonl`` (pretraining), ``sft.jsonl`` (train), ``sft_heldout.jsonl`` (held-out prompts with
    one in-distribution reference response each, for the loss column) and ``prompts.jsonl`` (held-out
    prompts for sampling) under ``out_dir``; returns their paths by name."""
    paths = {k: f"{out_dir}/{k}.jsonl" for k in ("raw", "sft", "sft_heldout", "prompts")}
    with open(paths["raw"], "w", encoding="utf-8") as f:
        for i, text in enumerate(pretraining_documents(documents, seed, instruction_share)):
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    rng = random.Random(seed + 1)
    with open(paths["sft"], "w", encoding="utf-8") as f:
        for _ in range(sft_samples):
            f.write(json.dumps(sft_sample(rng)) + "\n")
    with open(paths["sft_heldout"], "w", encoding="utf-8") as f:
        for i in range(4 * len(HELDOUT_PROMPTS)):
            s = sft_sample(rng)
            s["prompt"] = HELDOUT_PROMPTS[i % len(HELDOUT_PROMPTS)]
            f.write(json.dumps(s) + "\n")
    with open(paths["prompts"], "w", encoding="utf-8") as f:
        for i, p in enumerate(HELDOUT_PROMPTS):
            f.write(json.dumps({"id": f"heldout-{i}", "prompt": p}) + "\n")
    return paths
