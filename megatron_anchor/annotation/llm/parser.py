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

Answers may also be JSON (``{"topic": "...", ...}``, what structured outputs produce), and document-level answers
give several chunks their tags under numbers (``[1]`` lines, or ``{"1": {...}, "2": {...}}``):
:func:`parse_document_output` maps them back to chunk numbers, so that only chunks missing or malformed in the
answer need to be asked again. A JSON answer cut short by the token limit still yields its complete chunks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

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
# A chunk header in a document-level answer: "[3]", "**[3]**", "Passage 3:", "## 3", optionally with tags after it.
_HEADER_RE = re.compile(
    r"^[\s*#>_-]*(?:\[\s*(\d{1,4})\s*\]|(?:passage|chunk|paragraph|part)\s*#?\s*(\d{1,4})\b|#+\s*(\d{1,4})\b)"
    r"[\s*:.)\]_-]*(.*)$", re.IGNORECASE)
_JSON_CHUNK_RE = re.compile(r'"(\d{1,4})"\s*:\s*(\{[^{}]*\})')
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


def _clean_body(text: str) -> str:
    body = text[:MAX_PARSE_CHARS]
    body = _THINK_RE.sub("\n", body)
    body = _FENCE_RE.sub("\n", body)
    # Delimiters become line breaks: "<|ann|>topic:x; genre:y<|/ann|>" reads like two tag lines.
    return _DELIM_RE.sub("\n", body)


def _json_pairs(obj: Dict[str, Any]) -> List[Tuple[str, str]]:
    """``key: value`` pairs of a JSON object of tags (lists are joined, nested objects skipped)."""
    pairs = []
    for k, v in obj.items():
        if isinstance(v, list):
            v = ", ".join(str(x) for x in v if isinstance(x, (str, int, float)))
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            pairs.append((str(k), str(v)))
    return pairs


def _as_json_object(body: str) -> Optional[Dict[str, Any]]:
    s = body.strip()
    if not s.startswith("{"):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_output(text: str, schema: TagSchema) -> ParseResult:
    """Parse one model output into schema tags (ordered as written, duplicates removed, capped)."""
    if not isinstance(text, str):
        return ParseResult([], f"output is {type(text).__name__}, not text")
    if not text.strip():
        return ParseResult([], "empty output")
    body = _clean_body(text)
    obj = _as_json_object(body)
    if obj is not None:
        return _collect(((k, v) for k, v in _json_pairs(obj)), schema, text)
    pairs = []
    for piece in _pieces(body):
        m = _PAIR_RE.match(_BULLET_RE.sub("", piece, count=1))
        if m:
            pairs.append((m.group(1), m.group(2)))
    return _collect(pairs, schema, text)


def _collect(pairs: Iterable[Tuple[str, str]], schema: TagSchema, text: str) -> ParseResult:
    """Schema tags from raw ``(key, value)`` pairs: canonical keys, clean values, no repeats, capped."""
    tags: List[Tag] = []
    seen_keys: Set[str] = set()
    seen_pairs: Set[Tuple[str, str]] = set()
    dropped = 0
    for raw_key, raw_value in pairs:
        key = schema.canonical(raw_key)
        if key is None:
            dropped += 1
            continue
        value = _clean_value(raw_value)
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


def parse_document_output(text: str, schema: TagSchema, n_chunks: int) -> Dict[int, ParseResult]:
    """Tags per chunk number (1..``n_chunks``) from a document-level answer; every number gets a result.

    Reads ``[N]``-headed sections of tag lines, a JSON object keyed by chunk number, or the complete chunk
    objects of a JSON answer that was cut short. A chunk missing from the answer, or whose section has no usable
    tags, gets a result with ``problem`` set. An answer without any header, for a window of one chunk, is read as
    that chunk's tags.
    """
    results: Dict[int, ParseResult] = {}
    if not isinstance(text, str) or not text.strip():
        why = "empty output" if isinstance(text, str) else f"output is {type(text).__name__}, not text"
        return {i: ParseResult([], why) for i in range(1, n_chunks + 1)}
    body = _clean_body(text)
    sections = _json_sections(body)
    if sections is None:
        sections = _line_sections(body, n_chunks)
    for i in range(1, n_chunks + 1):
        section = sections.get(i)
        if section is None:
            results[i] = ParseResult([], f"chunk {i} missing from the answer")
        elif isinstance(section, dict):
            results[i] = _collect(_json_pairs(section), schema, json.dumps(section))
        else:
            results[i] = parse_output(section, schema)
    return results


def _json_sections(body: str) -> Optional[Dict[int, Any]]:
    """Chunk number -> JSON object of tags, or None when the answer is not JSON-shaped."""
    obj = _as_json_object(body)
    if obj is not None:
        out = {}
        for k, v in obj.items():
            if str(k).strip().isdigit() and isinstance(v, dict):
                out.setdefault(int(k), v)
        return out
    if not body.lstrip().startswith("{"):
        return None
    out = {}  # cut short (token limit): keep the chunk objects that are complete
    for m in _JSON_CHUNK_RE.finditer(body):
        try:
            v = json.loads(m.group(2))
        except ValueError:
            continue
        if isinstance(v, dict):
            out.setdefault(int(m.group(1)), v)
    return out


def _line_sections(body: str, n_chunks: int) -> Dict[int, str]:
    """Chunk number -> the text under its header (the first section wins when a number repeats)."""
    sections: Dict[int, List[str]] = {}
    current: Optional[List[str]] = None
    preamble: List[str] = []
    for line in body.splitlines():
        m = _HEADER_RE.match(line)
        if m:
            number = int(next(g for g in m.groups()[:3] if g is not None))
            current = sections.setdefault(number, []) if number not in sections else []
            if m.group(4).strip():
                current.append(m.group(4))
        elif current is not None:
            current.append(line)
        else:
            preamble.append(line)
    if not sections and n_chunks == 1:
        sections[1] = preamble
    return {i: "\n".join(lines) for i, lines in sections.items()}
