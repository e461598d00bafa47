"""The annotated JSONL schema: the interface between annotators and the preprocessing tools.

One JSON object per line. An *annotated* document::

    {"id": "doc-17",                       # optional, any JSON string or number
     "chunks": [                           # required, non-empty, in document order
        {"text": "First paragraph ...",    # required: the chunk's exact text
         "sep": "\\n\\n",                    # optional (default ""): the blank-line separator after the chunk
         "tags": [["topic", "cooking"],    # required for annotated chunks: ordered [key, value] pairs;
                  ["genre", "recipe"]]},   #   [] means "annotated, no tags"; null/absent means "not annotated"
        {"text": "Second paragraph ...", "sep": "", "tags": [["topic", "baking"]]}],
     "meta": {...}}                        # optional, carried through untouched

Joining ``text + sep`` over the chunks gives the original document. A *raw* document is ``{"text": "..."}``
(the key is configurable); the tools chunk it at blank lines and annotate it.

Keys are lower-case identifiers (``[a-z][a-z0-9_]*``); values are non-empty single-line strings without the
annotation delimiters or the tag separator ``;`` (see :mod:`megatron_anchor.annotation.format`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import msgspec

try:  # orjson parses JSONL several times faster; the standard library is the fallback
    from orjson import JSONDecodeError as _JSONDecodeError
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import JSONDecodeError as _JSONDecodeError
    from json import loads as _loads

from megatron_anchor.annotation.chunking import split_chunks
from megatron_anchor.annotation.format import MAX_VALUE_CHARS, Tag, tag_problem


class DocumentError(ValueError):
    """A document that cannot be used, with where it came from (``file:line``) in the message."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason

    def __reduce__(self):
        # Keep both fields when the error crosses a process boundary (worker pools pickle exceptions).
        return (type(self), (self.where, self.reason))


@dataclass
class Chunk:
    """One chunk of a document: its exact text, the separator after it, and its tags (None: not annotated)."""

    text: str
    sep: str = ""
    tags: Optional[List[Tag]] = None

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"text": self.text, "sep": self.sep}
        if self.tags is not None:
            out["tags"] = [list(t) for t in self.tags]
        return out


@dataclass
class Document:
    """A document as a list of chunks. ``doc_id`` and ``meta`` are carried through untouched."""

    chunks: List[Chunk]
    doc_id: Optional[Union[str, int]] = None
    meta: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The original document text."""
        return "".join(c.text + c.sep for c in self.chunks)

    @property
    def annotated(self) -> bool:
        """True when every chunk carries a tag list (possibly empty)."""
        return all(c.tags is not None for c in self.chunks)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self.extra)
        if self.doc_id is not None:
            out["id"] = self.doc_id
        out["chunks"] = [c.to_json() for c in self.chunks]
        if self.meta is not None:
            out["meta"] = self.meta
        return out

    def to_jsonl(self) -> str:
        """One line of annotated JSONL (no trailing newline)."""
        return json.dumps(self.to_json(), ensure_ascii=False)


_VALID_TAGS: Dict[int, Dict[Tag, Tag]] = {}  # max_value_chars -> {tag: the same tag, as first validated}
_VALID_TAGS_LIMIT = 500_000


def parse_tags(raw: Any, where: Callable[[], str], max_value_chars: int = MAX_VALUE_CHARS, field: str = "tags",
               item: str = "tag") -> List[Tag]:
    """Validate one chunk's decoded ``tags`` list; ``where()`` names the chunk in a :class:`DocumentError`, whose
    message calls the list ``field`` and each pair an ``item`` (SFT samples: ``annotation``, ``annotation tag``).

    The JSON bytes of ``raw`` are an exact key for a memo of tags already validated: two JSON texts are equal
    only when they spell equal values of the same JSON types."""
    if not isinstance(raw, list):
        raise DocumentError(where(), f"'{field}' must be a list of [key, value] pairs, got {type(raw).__name__}")
    tags: List[Tag] = []
    valid = _VALID_TAGS.get(max_value_chars)
    if valid is None:
        valid = _VALID_TAGS[max_value_chars] = {}
    for t in raw:
        # Tags repeat across a corpus: remember the ones already validated (a dict probe beats the checks), and
        # hand out the first-validated tuple, whose strings already carry their hashes for the lookups after.
        if type(t) is list and len(t) == 2:
            try:
                known = valid.get(tuple(t))
            except TypeError:  # an unhashable key or value: the checks below say what is wrong
                known = None
            if known is not None:
                tags.append(known)
                continue
        if not (isinstance(t, (list, tuple)) and len(t) == 2):
            raise DocumentError(where(), f"each {item} must be a [key, value] pair, got {t!r:.80}")
        problem = tag_problem(t[0], t[1], max_value_chars)
        if problem:
            raise DocumentError(where(), problem)
        tag = (t[0], t[1])
        tags.append(tag)
        if len(valid) < _VALID_TAGS_LIMIT:
            valid[tag] = tag
    return tags


def _chunk_where(where: str, index: int) -> str:
    return f"{where} chunk {index}"


def parse_document(
    obj: Any,
    where: str,
    text_key: str = "text",
    max_value_chars: int = MAX_VALUE_CHARS,
) -> Document:
    """Validate one decoded JSON line and return a :class:`Document`.

    Raises :class:`DocumentError` naming ``where`` for any problem: not an object, neither ``chunks`` nor
    ``text_key``, wrong types, empty documents, bad tags. Raw documents come back chunked, with ``tags=None``.
    """
    if not isinstance(obj, dict):
        raise DocumentError(where, f"expected a JSON object, got {type(obj).__name__}")
    doc_id = obj.get("id")
    meta = obj.get("meta")
    if "chunks" in obj:
        raw_chunks = obj["chunks"]
        if not isinstance(raw_chunks, list):
            raise DocumentError(where, f"'chunks' must be a list, got {type(raw_chunks).__name__}")
        if not raw_chunks:
            raise DocumentError(where, "empty document: 'chunks' is an empty list")
        chunks: List[Chunk] = []
        for i, c in enumerate(raw_chunks):
            # The chunk's name for error messages is only formatted when there is an error to report.
            if type(c) is dict:
                text = c.get("text")
                sep = c.get("sep", "")
                if type(text) is str and text and type(sep) is str and (not sep or sep.isspace()):
                    tags = c.get("tags")
                    if tags is not None:
                        tags = parse_tags(tags, partial(_chunk_where, where, i), max_value_chars)
                    chunks.append(Chunk(text, sep, tags))
                    continue
            cw = partial(_chunk_where, where, i)
            if not isinstance(c, dict):
                raise DocumentError(cw(), f"a chunk must be an object, got {type(c).__name__}")
            text = c.get("text")
            if not isinstance(text, str):
                raise DocumentError(cw(), "missing or non-string 'text'")
            if not text:
                raise DocumentError(cw(), "empty chunk text")
            sep = c.get("sep", "")
            if not isinstance(sep, str) or sep.strip():
                raise DocumentError(cw(), f"'sep' must be a whitespace-only string, got {sep!r:.40}")
            tags = c.get("tags")
            chunks.append(Chunk(text, sep, None if tags is None else parse_tags(tags, cw, max_value_chars)))
        extra = {k: v for k, v in obj.items() if k not in ("id", "meta", "chunks")}
        return Document(chunks, doc_id, meta, extra)
    if text_key in obj:
        text = obj[text_key]
        if not isinstance(text, str):
            raise DocumentError(where, f"'{text_key}' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DocumentError(where, "empty document")
        chunks = [Chunk(t, s, None) for t, s in split_chunks(text)]
        extra = {k: v for k, v in obj.items() if k not in ("id", "meta", text_key)}
        return Document(chunks, doc_id, meta, extra)
    raise DocumentError(where, f"a document needs 'chunks' (annotated) or '{text_key}' (raw); keys: {sorted(obj)[:8]}")


def load_line(line: bytes, where: str) -> Any:
    """Decode one JSONL line (strict UTF-8); every failure is a :class:`DocumentError` naming ``where``."""
    try:
        return _loads(line)  # orjson validates UTF-8 itself, so the line is not decoded twice
    except _JSONDecodeError as e:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as u:
            raise DocumentError(where, f"invalid UTF-8 at byte {u.start}") from None
        raise DocumentError(where, f"malformed JSON: {e.msg} at column {e.colno}") from None


class _RawChunk(msgspec.Struct):
    text: str
    sep: str = ""
    tags: msgspec.Raw = msgspec.Raw()  # empty: no "tags" field


class _RawDocument(msgspec.Struct):
    chunks: List[_RawChunk]


_decode_annotated = msgspec.json.Decoder(_RawDocument).decode


def annotated_chunks(line: bytes) -> Optional[List[Any]]:
    """An annotated line's chunks, each with ``.text``, ``.sep`` and ``.tags`` (the raw JSON bytes of its tags,
    undecoded; empty when it has none), or None when the line is not an object with a list of such chunks.
    None says nothing about why: :func:`load_line` and :func:`parse_document` do.

    The fast path of annotated preprocessing: typed decoding builds one small struct and two strings per chunk,
    where a generic decode builds a dict, and a list and two strings per tag, and the raw tags are an exact memo
    key (equal JSON bytes, equal tags). Field types are checked while decoding; everything else (non-empty text,
    whitespace-only sep, valid tags) is the caller's to check. Duplicate keys resolve as in :func:`load_line`
    (the last wins), and invalid UTF-8 or JSON fails the same lines."""
    try:
        return _decode_annotated(line).chunks
    except msgspec.DecodeError:
        return None


def parse_line(
    line: bytes, where: str, text_key: str = "text", max_value_chars: int = MAX_VALUE_CHARS
) -> Document:
    """Decode (strict UTF-8) and parse one JSONL line; every failure is a :class:`DocumentError`."""
    return parse_document(load_line(line, where), where, text_key, max_value_chars)


def document_text(obj: Any, where: str, text_key: str = "text") -> Tuple[str, int]:
    """``(text, chunks)`` of a decoded line, validated as :func:`parse_document` validates it.

    A valid raw document's text is returned as it is, without splitting it into chunks (``chunks`` is then 0:
    not counted); anything else goes through :func:`parse_document` (annotated documents, and every error).
    """
    if type(obj) is dict and "chunks" not in obj:
        text = obj.get(text_key)
        if type(text) is str and text and not text.isspace():
            return text, 0
    doc = parse_document(obj, where, text_key)
    return doc.text, len(doc.chunks)
