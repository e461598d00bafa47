"""Read tags out of whatever the annotator model wrote.

Models wrap answers in code fences, bullets, bold keys, numbered lists, ``key = value``, one-line
``key: a; key2: b`` runs, our own ``<|ann|>...<|/ann|>`` form, or prose around the tags. A document may also
carry a prompt injection that makes the model echo delimiters or write megabytes. The parser:

- reads at most :data:`MAX_PARSE_CHARS` of the output and keeps at most ``schema.max_tags`` tags, so its cost
  and its result are bounded whatever comes back;
- maps keys through the schema (case, spaces, aliases, plurals) and drops unknown keys unless the schema
  keeps them;
- sanitises values with :func:`format.sanitize_tags` (no delimiter text, no newlines, no separator, capped), so
  every tag it returns passes :func:`format.tag_problem`;
- reports *why* when nothing usable is found, so the caller can retry and then record the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Set, Tuple

from megatron_anchor.annotation.format import DELIMITERS, Tag, sanitize_tags
from megatron_anchor.annotation.llm.tagschema import TagSchema

MAX_PARSE_CHARS = 16_384
"""Only this much of an output is read; real answers are a few hundred characters."""

_THINK_RE = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"^\s*(?:```|~~~)[\w-]*\s*$", re.MULTILINE)
_DELIM_RE = re.compile("|".join(re.escape(d) for d in DELIMITERS))
# A new tag starts after ";" or "," only when a key-like word and a colon follow: "topic: a; genre: b".
_RUN_SPLIT_RE = re.compile(r"[;,|]\s*(?=[A-Za-z][A-Za-z0-9 _\-]{0,31}\s*[:=]\s*\S)")
_BULLET_RE = re.compile(r"^\s*(?:[-*+\u2022\u2023\u25e6>#]+|\(?\d{1,3}[.)\]]|[a-z][.)])\s*")
_PAIR_RE = re.compile(r"""^["'`*_\[]*([A-Za-z][A-Za-z0-9 _\-]{0,40}?)["'`*_\]]*\s*[:=]\s*(.*)$""")
_VALUE_EDGE = " \t\"'`*_[](){}.,;"
_EMPTY_VALUES = frozenset({"", "none", "n/a", "na", "null", "unknown", "not applicable", "-", "--", "nil"})


@dataclass
class ParseResult:
    """Tags found in one output, or the reason none were (``problem``)."""

    tags: List[Tag]
    problem: Optional[str] = None
    dropped_keys: int = 0
    """Well-formed ``key: value`` lines whose key was not in the schema (diagnostics only)."""

    @property
    def ok(self) -> bool:
        """True when at least one tag was found."""
        return bool(self.tags)


def _pieces(text: str) -> List[str]:
    pieces: List[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            pieces.extend(p for p in _RUN_SPLIT_RE.split(line) if p.strip())
    return pieces


def _clean_value(raw: str) -> str:
    value = raw.strip().strip(_VALUE_EDGE).strip()
    return "" if value.lower() in _EMPTY_VALUES else value


def parse_output(text: str, schema: TagSchema) -> ParseResult:
    """Parse one model output into schema tags (ordered as written, duplicates removed, capped)."""
    if not isinstance(text, str):
        return ParseResult([], f"output is {type(text).__name__}, not text")
    if not text.strip():
        return ParseResult([], "empty output")
    body = text[:MAX_PARSE_CHARS]
    body = _THINK_RE.sub("\n", body)
    body = _FENCE_RE.sub("\n", body)
    # Delimiters become line breaks: "<|ann|>topic:x; genre:y<|/ann|>" reads like two tag lines.
    body = _DELIM_RE.sub("\n", body)

    tags: List[Tag] = []
    seen_keys: Set[str] = set()
    seen_pairs: Set[Tuple[str, str]] = set()
    dropped = 0
    for piece in _pieces(body):
        m = _PAIR_RE.match(_BULLET_RE.sub("", piece, count=1))
        if not m:
            continue
        key = schema.canonical(m.group(1))
        if key is None:
            dropped += 1
            continue
        value = _clean_value(m.group(2))
        if not value:
            continue
        clean = sanitize_tags([(key, value)], schema.max_value_chars)
        if not clean:
            continue
        key, value = clean[0]
        pair = (key, value.lower())
        if pair in seen_pairs or (key in seen_keys and not schema.is_multi(key)):
            continue
        seen_pairs.add(pair)
        seen_keys.add(key)
        tags.append((key, value))
        if len(tags) >= schema.max_tags:
            break

    if tags:
        return ParseResult(tags, None, dropped)
    snippet = " ".join(text[:80].split())
    if dropped:
        return ParseResult([], f"no schema keys in output ({dropped} unknown key lines): {snippet!r}", dropped)
    return ParseResult([], f"no key: value lines in output: {snippet!r}")
