"""The real-text study's material: every file the study reads, from the registries' public text and instruction
data (or from the user's own ``--corpus``, ``--sft-input`` and ``--prompts``).

    python -m megatron_anchor.corpora.material --out-dir WORK/data [--small] [--corpus C] [--sft-input S]
        [--prompts P]

Writes into ``--out-dir`` (each file under a temporary name, renamed when complete; ``material.json`` last, so a
folder that has it is complete):

- ``corpus.jsonl``: pretraining documents ``{"id", "source", "text"}`` (every document whose id does not hash into
  the held-out share);
- ``heldout.jsonl``: the held-out documents (no model trains on them): the source of ``calibration.jsonl`` and
  ``cloze.jsonl``;
- ``llm_sample.jsonl``: excerpts of consecutive chunks of randomly chosen training documents, ``{"id":
  "DOC#START", "text"}``, for the LLM annotator; its tags go back onto those chunks (:func:`pretag_corpus`) and
  teach the distilled annotator, which tags the rest;
- ``sft.jsonl``: narrow instruction data, ``{"prompt", "response"}``: ShareGPT's exchanges whose request asks for a
  story (:data:`STORY`), as real instruction data is narrow;
- ``prompts.jsonl``: held-out requests of other kinds (poems, songs, letters, speeches, jokes, ...;
  :data:`OTHER_KINDS`), ``{"id", "prompt"}`` as NoveltyBench's ``curated.jsonl``;
- ``calibration.jsonl``: labelled pairs ``{"a", "b", "same"}`` of held-out chunks for the distinct-class threshold,
  labelled by provenance: ``same`` = two chunks of one held-out document, different = chunks of two documents;
- ``cloze.jsonl``: multiple-choice cloze questions from held-out sentences (:func:`cloze_questions`);
- ``material.json``: counts, sizes and how everything was chosen.

Time: one pass over the sources (~28 MB of text, ~17k ShareGPT conversations: about a minute after the first
fetch); memory: the corpus's documents (tens of MB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_anchor.bounds import bounded, check
from megatron_anchor.corpora import inputs, sources

STORY = re.compile(r"\b(write|tell|create|compose|generate|make up|give me|craft)\b[^\n]{0,80}"
                   r"\b(story|stories|tale|fable|fairy ?tale)\b", re.I)
"""A request for a story: the narrow SFT set."""
OTHER_KINDS = re.compile(r"^\s*(please\s+)?(write|compose|create)\b[^.?!\n]{0,50}\b(poem|song|lyrics|haiku|limerick|"
                         r"essay|letter|speech|joke|riddle|slogan|toast|description|dialogue)\b", re.I)
"""A held-out request of another kind (an open-ended creative request that is not a story)."""
CODE = re.compile(r"```|[{};<>]|\bdef |\bfunction\b|\bSELECT\b|https?://")


@dataclass
class MaterialConfig:
    """What the study's material holds. Counts are upper bounds: a source with less gives less."""

    out_dir: str
    """Where the files go (created)."""
    corpus: Optional[str] = None
    """JSONL with a "text" per line instead of the registries' text (ids from its "id", else the line number)."""
    sft_input: Optional[str] = None
    """SFT JSONL (prompt/response or messages) instead of ShareGPT's story requests."""
    prompts: Optional[str] = None
    """Held-out prompts JSONL ("prompt" or "messages"; NoveltyBench's curated.jsonl as it is)."""
    small: bool = False
    """A few documents per source and a handful of everything: the smoke size."""
    heldout_percent: int = bounded(5, ge=1, le=50)
    """Share of documents (by a hash of their id) held out of training, in percent."""
    docs_per_source: int = bounded(0, ge=0)
    """Most documents per source (0: all; the small size takes 6)."""
    llm_chunks: int = bounded(240, ge=1)
    """Chunks in the LLM annotator's sample (the small size takes 6)."""
    llm_excerpt_chunks: int = bounded(8, ge=1)
    """Consecutive chunks per excerpt of the sample (the small size takes 2: three excerpts, as distillation holds out
    one document for testing and one for validation)."""
    sft_samples: int = bounded(200, ge=1)
    """Most SFT samples (the small size takes 6)."""
    prompt_count: int = bounded(16, ge=1)
    """Held-out prompts (the small size takes 2)."""
    calibration_pairs: int = bounded(300, ge=2)
    """Labelled pairs of each kind (same, different; the small size takes 24)."""
    cloze_questions: int = bounded(400, ge=4)
    """Cloze questions (the small size takes 24)."""
    seed: int = 0
    """Every random choice's seed."""
    sources: Tuple[str, ...] = field(default=sources.SOURCES)
    """Text sources when no corpus is given."""

    def __post_init__(self) -> None:
        if self.small:
            self.docs_per_source = self.docs_per_source or 6
            self.llm_chunks, self.llm_excerpt_chunks = min(self.llm_chunks, 6), min(self.llm_excerpt_chunks, 2)
            self.sft_samples, self.prompt_count = min(self.sft_samples, 6), min(self.prompt_count, 2)
            self.calibration_pairs, self.cloze_questions = min(self.calibration_pairs, 24), \
                min(self.cloze_questions, 24)
        check(self)


def _hash(text: str, seed: int = 0) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big")


def is_heldout(doc_id: str, percent: int) -> bool:
    """Whether a document is held out: a stable hash of its id, independent of the order documents come in."""
    return _hash(doc_id) % 100 < percent


def _write_jsonl(path: str, rows: Iterable[dict]) -> int:
    from megatron_anchor.outputs import atomic_write

    n = 0
    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def registry_documents(cfg: MaterialConfig) -> List[Dict[str, str]]:
    """Documents of every source in ``cfg.sources``, sorted by id within each source."""
    docs = []
    for name in cfg.sources:
        docs.extend(sorted(sources.read_source(name), key=lambda d: d["id"]))
    return docs


def limit_per_source(docs: Sequence[Dict[str, str]], most: int, seed: int) -> List[Dict[str, str]]:
    """At most ``most`` documents per source, chosen by a hash of the id (a smaller size's choice is a subset of a
    larger one's), in their original order."""
    keep = set()
    by_source: Dict[str, List[Dict[str, str]]] = {}
    for d in docs:
        by_source.setdefault(d.get("source", "corpus"), []).append(d)
    for ds in by_source.values():
        keep.update(d["id"] for d in sorted(ds, key=lambda d: _hash(d["id"], seed))[:most])
    return [d for d in docs if d["id"] in keep]


def chunks_of(doc: Dict[str, str]) -> List[str]:
    """A document's chunks (the annotator's blank-line split)."""
    from megatron_anchor.annotation.chunking import split_chunks

    return [c for c, _ in split_chunks(doc["text"])]


def llm_sample(train: Sequence[Dict[str, str]], chunks: int, per_excerpt: int, seed: int) -> List[Dict[str, str]]:
    """Excerpts of ``per_excerpt`` consecutive chunks from random training documents until ``chunks`` are taken
    (one excerpt per document), ids ``DOC#START``."""
    rng = random.Random(seed)
    order = list(range(len(train)))
    rng.shuffle(order)
    out, taken = [], 0
    for i in order:
        if taken >= chunks:
            break
        cs = chunks_of(train[i])
        k = min(per_excerpt, len(cs), chunks - taken)
        start = rng.randrange(len(cs) - k + 1)
        out.append({"id": f"{train[i]['id']}#{start}", "text": "\n\n".join(cs[start:start + k])})
        taken += k
    return out


def instruction_data(cfg: MaterialConfig) -> Tuple[List[dict], List[dict], Dict[str, int]]:
    """``(sft samples, held-out prompts, counts)`` from ShareGPT's human -> assistant exchanges: story requests with their
    replies (the SFT set) and requests of other kinds (the prompts), deduplicated, in a seeded order."""
    stories, others, seen = [], [], set()
    counts = {"exchanges": 0, "story_requests": 0, "other_kind_requests": 0}
    for cid, human, reply in sources.exchanges(sources.sharegpt_records()):
        counts["exchanges"] += 1
        key = " ".join(human.lower().split())
        if key in seen or CODE.search(human):
            continue
        seen.add(key)
        if STORY.search(human) and 15 <= len(human) <= 400 and 200 <= len(reply) <= 3000 and not CODE.search(reply):
            stories.append({"id": f"sharegpt-{cid}", "prompt": human, "response": reply})
        elif OTHER_KINDS.search(human) and not STORY.search(human) and 20 <= len(human) <= 300:
            others.append({"id": f"sharegpt-{cid}", "prompt": human})
    counts["story_requests"], counts["other_kind_requests"] = len(stories), len(others)
    rng = random.Random(cfg.seed)
    rng.shuffle(stories)
    rng.shuffle(others)
    return stories[:cfg.sft_samples], others[:cfg.prompt_count], counts


def _clip(text: str, chars: int = 400) -> str:
    if len(text) <= chars:
        return text
    cut = text[:chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def calibration_pairs(heldout: Sequence[Dict[str, str]], n: int, seed: int) -> List[dict]:
    """``n`` same-document and ``n`` different-document pairs of held-out chunks (80-1,200 characters, clipped
    to 400 at a word boundary, about a response's length). The labels are provenance, not any model's output."""
    rng = random.Random(seed)
    docs = [[c for c in chunks_of(d) if 80 <= len(c) <= 1200] for d in heldout]
    multi = [cs for cs in docs if len(cs) >= 2]
    any_doc = [cs for cs in docs if cs]
    if not multi or len(any_doc) < 2:
        raise ValueError("the held-out documents hold too few chunks of 80-1,200 characters for calibration "
                         "pairs (at least one document with two, and two documents)")
    pairs = []
    for _ in range(n):
        a, b = rng.sample(rng.choice(multi), 2)
        pairs.append({"a": _clip(a), "b": _clip(b), "same": True})
        da, db = rng.sample(range(len(any_doc)), 2)
        pairs.append({"a": _clip(rng.choice(any_doc[da])), "b": _clip(rng.choice(any_doc[db])), "same": False})
    return pairs


_WORD = re.compile(r"^[a-z]{4,}$")


def cloze_questions(heldout: Sequence[Dict[str, str]], n: int, seed: int, choices: int = 4) -> List[dict]:
    """Multiple-choice cloze questions from held-out sentences (LAMBADA's shape): the context is a sentence of
    10-40 words without its last word; the right choice is that word, the wrong ones are the last words of other
    held-out sentences. ``{"context", "choices", "label", "source"}``; each choice starts with a space."""
    rng = random.Random(seed)
    cands = []
    for d in heldout:
        for chunk in chunks_of(d):
            for s in sources.sentences(chunk):
                words = s.split()
                last = words[-1].rstrip(".!?;:,\"')")
                if 10 <= len(words) <= 40 and _WORD.match(last) and "\n" not in s:
                    cands.append((" ".join(words[:-1]), last, d.get("source", "corpus")))
    if len(cands) < choices:
        raise ValueError(f"the held-out documents hold {len(cands)} sentences usable for cloze questions; "
                         f"at least {choices} are needed")
    rng.shuffle(cands)
    out = []
    for context, answer, source in cands:
        if len(out) >= n:
            break
        wrong = list(dict.fromkeys(w for _, w, _ in rng.sample(cands, min(len(cands), 4 * choices)) if w != answer))
        if len(wrong) < choices - 1:
            continue
        options = [answer] + wrong[: choices - 1]
        order = list(range(choices))
        rng.shuffle(order)
        out.append({"context": context, "choices": [" " + options[i] for i in order], "label": order.index(0),
                    "source": source})
    return out


def build_material(cfg: MaterialConfig) -> Dict:
    """Write the study's files (module docstring) and return the summary written to ``material.json``."""
    # The user's files are checked before anything is fetched or written: a bad line stops the study here.
    docs = inputs.read_corpus(cfg.corpus) if cfg.corpus else None
    given_sft = inputs.read_sft(cfg.sft_input) if cfg.sft_input else None
    given_prompts = inputs.read_prompt_objects(cfg.prompts) if cfg.prompts else None
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = lambda name: os.path.join(cfg.out_dir, name)  # noqa: E731
    docs = docs if docs is not None else registry_documents(cfg)
    train = [d for d in docs if not is_heldout(d["id"], cfg.heldout_percent)]
    heldout = [d for d in docs if is_heldout(d["id"], cfg.heldout_percent)]
    if cfg.docs_per_source:  # the held-out side keeps enough documents for pairs and questions
        train = limit_per_source(train, cfg.docs_per_source, cfg.seed)
        heldout = limit_per_source(heldout, max(2, cfg.docs_per_source // 2), cfg.seed)
    if not train or not heldout:
        raise ValueError(f"{cfg.corpus or 'the registry text'}: {len(docs)} documents leave "
                         f"{len(train)} to train on and {len(heldout)} held out; both need at least one")
    summary: Dict = {"config": {k: v for k, v in asdict(cfg).items() if k != "out_dir"}, "files": {}}
    summary["files"]["corpus.jsonl"] = _write_jsonl(path("corpus.jsonl"), train)
    summary["files"]["heldout.jsonl"] = _write_jsonl(path("heldout.jsonl"), heldout)
    by_source: Dict[str, List[int]] = {}
    for d in train:
        by_source.setdefault(d.get("source", "corpus"), [0, 0, 0])
        s = by_source[d.get("source", "corpus")]
        s[0], s[1], s[2] = s[0] + 1, s[1] + len(d["text"]), s[2] + len(chunks_of(d))
    summary["train_by_source"] = {k: {"documents": a, "characters": b, "chunks": c} for k, (a, b, c) in
                                  sorted(by_source.items())}
    sample = llm_sample(train, cfg.llm_chunks, cfg.llm_excerpt_chunks, cfg.seed)
    summary["files"]["llm_sample.jsonl"] = _write_jsonl(path("llm_sample.jsonl"), sample)
    if given_sft is not None and given_prompts is not None:
        sft, prompts, counts = given_sft, given_prompts, {}
    else:
        sft, prompts, counts = instruction_data(cfg)
        sft, prompts = given_sft or sft, given_prompts or prompts
    if not sft or not prompts:
        raise ValueError(f"no {'SFT samples' if not sft else 'held-out prompts'} were found in the instruction data")
    summary["sharegpt"] = counts
    summary["files"]["sft.jsonl"] = _write_jsonl(path("sft.jsonl"), sft)
    summary["files"]["prompts.jsonl"] = _write_jsonl(path("prompts.jsonl"), prompts)
    summary["files"]["calibration.jsonl"] = _write_jsonl(
        path("calibration.jsonl"), calibration_pairs(heldout, cfg.calibration_pairs, cfg.seed + 1))
    summary["files"]["cloze.jsonl"] = _write_jsonl(path("cloze.jsonl"),
                                                   cloze_questions(heldout, cfg.cloze_questions, cfg.seed + 2))
    summary["labels"] = ("calibration pairs labelled by provenance: same = two chunks of one held-out document, "
                         "different = chunks of two held-out documents")
    from megatron_anchor.outputs import write_json

    write_json(path("material.json"), summary, indent=2)
    return summary


def pretag_corpus(corpus: str, annotated_sample: str, out: str) -> Dict[str, int]:
    """``corpus`` in the annotated schema, the chunks of the LLM's sample carrying its tags and every other chunk
    untagged (``tools/annotate.py`` then tags only those and keeps the rest). Returns counts."""
    from megatron_anchor.annotation.chunking import split_chunks
    from megatron_anchor.annotation.schema import Chunk, Document, parse_line

    tagged: Dict[str, Dict[int, list]] = {}
    with open(annotated_sample, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            doc = parse_line(line, f"{annotated_sample}:{i}")
            base, _, start = str(doc.doc_id).rpartition("#")
            for j, c in enumerate(doc.chunks):
                if c.tags is not None:
                    tagged.setdefault(base, {})[int(start) + j] = c.tags
    counts = {"documents": 0, "chunks": 0, "pretagged": 0}

    def rows():
        for d in inputs.read_corpus(corpus):
            tags = tagged.get(d["id"], {})
            chunks = [Chunk(t, s, tags.get(j)) for j, (t, s) in enumerate(split_chunks(d["text"]))]
            counts["documents"] += 1
            counts["chunks"] += len(chunks)
            counts["pretagged"] += sum(c.tags is not None for c in chunks)
            yield Document(chunks, d["id"], extra={"source": d.get("source", "corpus")}).to_json()

    _write_jsonl(out, rows())
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    """Build the material (``material``, the default) or merge the LLM's tags into the corpus (``pretag``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", help="where the material goes")
    p.add_argument("--corpus", default=None, help="JSONL with a 'text' per line (default: the registries' text)")
    p.add_argument("--sft-input", default=None, help="SFT JSONL (default: ShareGPT's story requests)")
    p.add_argument("--prompts", default=None, help="held-out prompts JSONL (default: ShareGPT's other requests)")
    p.add_argument("--small", action="store_true", help="the smoke size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretag", nargs=3, metavar=("CORPUS", "ANNOTATED_SAMPLE", "OUTPUT"), default=None,
                   help="write CORPUS in the annotated schema with the sample's tags on their chunks")
    args = p.parse_args(argv)
    try:
        if args.pretag:
            print(json.dumps(pretag_corpus(*args.pretag)))
            return 0
        if not args.out_dir:
            p.error("--out-dir is required")
        summary = build_material(MaterialConfig(args.out_dir, args.corpus, args.sft_input, args.prompts,
                                                args.small, seed=args.seed))
    except (ValueError, ImportError, OSError, sources.registry.RegistryError) as e:
        print(f"material: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
