"""The embedded default annotator: fast, deterministic, offline, no model.

It stands in for the LLM annotator when no server is available (quickstart, tests, raw-text preprocessing).
It is not meant to be accurate; like the LLM annotator it must give tags that vary with the content:

- ``topic``: the lexicon topic whose cue words occur most often in the chunk (``general`` when none does);
- ``genre``: code, list, dialogue, question, narrative or exposition, from surface cues;
- ``entities``: up to two capitalised words that do not start a sentence, most frequent first;
- ``tone``: excited, inquisitive, negative or neutral;
- ``length``: short, medium or long.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Dict, List

from megatron_anchor.annotation.format import Tag, sanitize_value
from megatron_anchor.annotation.schema import Document

ANNOTATOR_NAME = "default-v1"

_TOPIC_CUES: Dict[str, str] = {}
for _topic, _words in {
    "cooking": "recipe cook cooking bake baking oven flour sugar butter salt pepper garlic onion sauce soup "
    "dish kitchen chef meal dinner lunch breakfast taste spice",
    "sports": "game team player players match score goal season coach league win won championship ball "
    "football soccer basketball tennis race",
    "science": "science scientist experiment theory physics chemistry biology molecule atom cell energy "
    "research laboratory hypothesis data particle",
    "technology": "computer software hardware code program internet network device app digital algorithm "
    "server user data chip phone",
    "health": "health doctor patient disease hospital medicine treatment symptom virus vaccine therapy "
    "diet exercise pain clinic",
    "politics": "government election vote president minister law policy party parliament senate campaign "
    "democracy citizens court",
    "business": "company market business sales price customer profit revenue investor stock bank money "
    "economy trade industry",
    "travel": "travel trip journey hotel flight city beach island tourist visit museum road train map",
    "nature": "forest river mountain tree trees animal animals bird birds ocean sea lake weather rain "
    "wind flower garden",
    "history": "history war king queen empire century ancient castle battle army revolution kingdom",
    "music": "music song songs band album guitar piano concert singer melody rhythm orchestra",
    "education": "school student students teacher class lesson university learn learning exam course",
    "family": "family mother father child children daughter son brother sister parents home baby",
    "space": "space planet star stars moon orbit rocket galaxy astronaut telescope universe",
    "art": "art artist painting paint museum gallery sculpture canvas color colour drawing",
    "crime": "police crime thief murder detective arrest prison judge stolen robbery",
}.items():
    for _w in _words.split():
        _TOPIC_CUES[_w] = _topic

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'\-]*")
_CAP_RE = re.compile(r"(?<![.!?]\s)(?<!^)\b([A-Z][a-z]{2,})\b")
_LIST_RE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s", re.MULTILINE)
_CODE_RE = re.compile(r"[{};]\s*$|^\s*(?:def|class|import|return|for|while|if)\b.*[:(]", re.MULTILINE)
_NEGATIVE = frozenset("bad sad terrible awful angry hate fear failed fail loss died death worst poor pain".split())
_NARRATIVE = frozenset("he she they was were had said went once".split())
_NOT_ENTITIES = frozenset("The This That These Those There Then When What Where Which While After Before".split())


def annotate_text(text: str) -> List[Tag]:
    """Tags for one chunk of text, in a fixed key order."""
    words = _WORD_RE.findall(text)
    lower = [w.lower() for w in words]
    topics = Counter(_TOPIC_CUES[w] for w in lower if w in _TOPIC_CUES)
    topic = min(topics.items(), key=lambda kv: (-kv[1], kv[0]))[0] if topics else "general"

    stripped = text.strip()
    if _CODE_RE.search(text):
        genre = "code"
    elif len(_LIST_RE.findall(text)) >= 2:
        genre = "list"
    elif text.count('"') >= 2 or text.count("\u201c") >= 1:
        genre = "dialogue"
    elif stripped.endswith("?"):
        genre = "question"
    elif sum(w in _NARRATIVE for w in lower) >= max(2, len(lower) // 25):
        genre = "narrative"
    else:
        genre = "exposition"

    tags: List[Tag] = [("topic", topic), ("genre", genre)]
    ents = Counter(m for m in _CAP_RE.findall(text) if m not in _NOT_ENTITIES)
    if ents:
        top = sorted(ents.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
        tags.append(("entities", sanitize_value(", ".join(e for e, _ in top))))

    if "!" in text:
        tone = "excited"
    elif "?" in text:
        tone = "inquisitive"
    elif any(w in _NEGATIVE for w in lower):
        tone = "negative"
    else:
        tone = "neutral"
    n = len(words)
    tags.append(("tone", tone))
    tags.append(("length", "short" if n < 40 else "medium" if n < 150 else "long"))
    return tags


def annotate_document(doc: Document) -> Document:
    """Fill in tags for every chunk that has none (``tags is None``); annotated chunks are left as they are."""
    for chunk in doc.chunks:
        if chunk.tags is None:
            chunk.tags = annotate_text(chunk.text)
    return doc
