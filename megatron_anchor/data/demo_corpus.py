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
from typing import AbstractSet, Dict, Iterable, Iterator, List, Sequence, Set, Tuple

from megatron_anchor.outputs import atomic_write

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
    "Now write some lines.", "Put together a short text.", "Write two or three sentences.",
    "Give me one short passage.", "Tell me anything at all.", "Draft a small paragraph.", "Pen a few lines for me.",
    "Write whatever comes to mind.", "Let me read something short.", "Come up with a brief passage.",
    "Produce a couple of sentences.", "Type out a short paragraph.", "Make up a few lines.",
    "Could you write a little?", "Show me a short piece.", "Write a small note for me.",
    "Give me some words to read.", "Please share a short passage.", "Tell me something short.",
    "Write a handful of sentences.", "Jot something down for me.", "Could you compose a few lines?",
    "Offer me a brief paragraph.", "Put a few sentences together.", "Write a line or two.",
]
"""32 phrasings: the distinct-class judge counts classes per prompt, so the mean over prompts moves in steps of
1/32 of a class (with 8 prompts one class on one prompt moved it by 1/8)."""

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


CALIBRATION_SEED = 99
"""One stream of calibration pairs for every corpus seed, so thresholds are comparable across seeds."""


def calibration_pairs(n: int = 1000, seed: int = CALIBRATION_SEED,
                      exclude: AbstractSet[str] = frozenset()) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """Labelled pairs of designed chunks for the distinct-class threshold: ``n`` ``same`` pairs (one topic and
    genre; names, places and words differ) and ``n`` ``different`` ones (another topic). The labels are the corpus
    design, not any model's or annotator's output. No chunk of a pair is in ``exclude`` (the corpus's own chunks:
    :func:`write_demo_corpus` passes every chunk it wrote), so the judge is calibrated on held-out text only.
    Time O(n); raises ValueError if ``exclude`` leaves a topic and genre almost no fresh chunk."""
    rng = random.Random(seed)
    topics, genres = list(TOPICS), list(TEMPLATES)

    def fresh(topic: str, genre: str) -> str:
        for _ in range(1000):
            text = chunk(rng, topic, genre)
            if text not in exclude:
                return text
        raise ValueError(f"no held-out chunk of topic {topic!r} and genre {genre!r} in 1000 draws: the corpus "
                         "holds nearly every chunk the design can make")

    same, different = [], []
    for _ in range(n):
        t, g = rng.choice(topics), rng.choice(genres)
        same.append((fresh(t, g), fresh(t, g)))
        other = rng.choice([x for x in topics if x != t])
        different.append((fresh(t, g), fresh(other, rng.choice(genres))))
    return same, different


def _write_jsonl(path: str, rows: Iterable[Dict]) -> None:
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_demo_corpus(out_dir: str, documents: int, sft_samples: int, seed: int = 0,
                      instruction_share: float = 0.1, calibration: int = 1000) -> Dict[str, str]:
    """Write under ``out_dir`` (each file under a temporary name first) and return their paths by name:
    ``raw.jsonl`` (pretraining), ``sft.jsonl`` (train), ``sft_heldout.jsonl`` (held-out prompts with
    in-distribution reference responses, for the loss column), ``prompts.jsonl`` (held-out prompts for sampling)
    and ``calibration.jsonl`` (``calibration`` same-class and as many different-class pairs ``{"a", "b", "same"}``
    of chunks that are in none of the other files, for the distinct-class threshold; the format
    ``tools/evaluate_diversity.py --calibration-pairs`` reads). Memory: the set of the corpus's distinct chunks."""
    paths = {k: f"{out_dir}/{k}.jsonl" for k in ("raw", "sft", "sft_heldout", "prompts", "calibration")}
    seen = set()
    raw = []
    for i, text in enumerate(pretraining_documents(documents, seed, instruction_share)):
        seen.update(text.split("\n\n"))
        raw.append({"id": f"doc-{i}", "text": text})
    _write_jsonl(paths["raw"], raw)
    rng = random.Random(seed + 1)
    sft = [sft_sample(rng) for _ in range(sft_samples)]
    heldout = [{**sft_sample(rng), "prompt": HELDOUT_PROMPTS[i % len(HELDOUT_PROMPTS)]}
               for i in range(4 * len(HELDOUT_PROMPTS))]
    seen.update(s["response"] for s in sft + heldout)
    _write_jsonl(paths["sft"], sft)
    _write_jsonl(paths["sft_heldout"], heldout)
    _write_jsonl(paths["prompts"], ({"id": f"heldout-{i}", "prompt": p} for i, p in enumerate(HELDOUT_PROMPTS)))
    write_calibration(paths["calibration"], seen, calibration)
    return paths


def write_calibration(path: str, exclude: AbstractSet[str], n: int = 1000) -> str:
    """:func:`calibration_pairs` with no chunk of ``exclude``, as JSONL ``{"a", "b", "same"}`` (written under a
    temporary name first); returns ``path``."""
    same, different = calibration_pairs(n, exclude=exclude)
    _write_jsonl(path, [{"a": a, "b": b, "same": True} for a, b in same]
                 + [{"a": a, "b": b, "same": False} for a, b in different])
    return path


def corpus_chunks(out_dir: str) -> Set[str]:
    """Every chunk of a corpus :func:`write_demo_corpus` wrote under ``out_dir`` (pretraining chunks, SFT and
    held-out reference responses): what calibration pairs must avoid. Memory: the distinct chunks."""
    seen: Set[str] = set()
    for name, key in (("raw", "text"), ("sft", "response"), ("sft_heldout", "response")):
        with open(f"{out_dir}/{name}.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    seen.update(json.loads(line)[key].split("\n\n"))
    return seen

