"""The one serialisation of annotated text: ``<z_1> x_1 <z_2> x_2 ... <z_n> x_n``.

An annotation ``z`` is a delimited, ordered list of ``key:value`` tags::

    <|ann|>topic:cooking; genre:recipe; location:Lyon<|/ann|>

``<|ann|>`` and ``<|/ann|>`` are dedicated special tokens (never produced by encoding ordinary text). Keys are
lower-case identifiers; values are free text without delimiter text, newlines or the tag separator. After the
closing delimiter comes the chunk's text verbatim, followed by the blank-line separator that followed the chunk
in the document, so the document text is recoverable exactly.

Pretraining preprocessing, SFT preprocessing and inference-time parsing all go through this module. It works
on *segments*: runs of text that share one role, so that tokenizing segment by segment gives every token
exactly one role.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from megatron_anchor.roles import Role

ANN_OPEN = "<|ann|>"
"""Opening annotation delimiter (a special token)."""
ANN_CLOSE = "<|/ann|>"
"""Closing annotation delimiter (a special token)."""
KV_SEP = ":"
"""Separates a tag's key from its value."""
TAG_SEP = "; "
"""Separates consecutive tags inside one annotation."""
DELIMITERS = (ANN_OPEN, ANN_CLOSE)

MAX_KEY_CHARS = 32
MAX_VALUE_CHARS = 96
"""Default cap on a tag value's length, in characters (values are short labels, not prose)."""

Tag = Tuple[str, str]

_KEY_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_DELIM_RE = re.compile("|".join(re.escape(d) for d in DELIMITERS))
_WS_RE = re.compile(r"\s+")
# A value with no '<', ';' or line break, not starting or ending with whitespace: valid without further checks.
_PLAIN_VALUE_RE = re.compile(r"[^\s;<](?:[^;<\r\n]*[^\s;<])?\Z")
_ANNOTATION_RE = re.compile(re.escape(ANN_OPEN) + r"(.*?)" + re.escape(ANN_CLOSE), re.DOTALL)


class Segment(NamedTuple):
    """A run of text with one role. ``special`` segments are a single special token (a delimiter).

    ``role`` holds a :class:`~megatron_anchor.roles.Role` or its int code (they compare equal).
    """

    text: str
    role: Role
    special: bool = False


# ---------------------------------------------------------------------------------------------------------
# Keys and values
# ---------------------------------------------------------------------------------------------------------


def normalize_key(key: str) -> str:
    """Lower-case a key and turn spaces/dashes into underscores (``"Time Period"`` -> ``"time_period"``)."""
    return re.sub(r"[\s\-]+", "_", key.strip().lower())


def tag_problem(key: object, value: object, max_value_chars: int = MAX_VALUE_CHARS) -> Optional[str]:
    """Why ``(key, value)`` cannot be serialised as-is, or None when it can.

    Used to reject bad annotated input with a clear message instead of silently rewriting it.
    """
    if (
        type(key) is str
        and type(value) is str
        and len(key) <= MAX_KEY_CHARS
        and len(value) <= max_value_chars
        and _KEY_RE.match(key)
        and _PLAIN_VALUE_RE.match(value)
    ):
        return None  # the common case, decided by two regex matches; the checks below explain failures
    if not isinstance(key, str) or not isinstance(value, str):
        return f"tag key and value must be strings, got {type(key).__name__} and {type(value).__name__}"
    if not _KEY_RE.match(key) or len(key) > MAX_KEY_CHARS:
        return (
            f"tag key {key!r} is not a lower-case identifier of at most {MAX_KEY_CHARS} characters "
            "([a-z][a-z0-9_]*)"
        )
    if not value.strip():
        return f"tag {key!r} has an empty value"
    if _DELIM_RE.search(value) or _DELIM_RE.search(key):
        return f"tag {key!r} contains annotation delimiter text ({' or '.join(DELIMITERS)})"
    if "\n" in value or "\r" in value:
        return f"tag {key!r} has a newline in its value"
    if TAG_SEP.strip() in value:
        return f"tag {key!r} contains the tag separator {TAG_SEP.strip()!r} in its value"
    if value != value.strip():
        return f"tag {key!r} has leading or trailing whitespace in its value"
    if len(value) > max_value_chars:
        return f"tag {key!r} value is {len(value)} characters long (limit {max_value_chars})"
    return None


def sanitize_value(value: str, max_chars: int = MAX_VALUE_CHARS) -> str:
    """Make any string a safe tag value: delimiter text removed, whitespace folded, separator replaced, capped.

    Removal repeats until stable, so text such as ``"<|a<|ann|>nn|>"`` cannot reassemble a delimiter.
    Returns ``""`` when nothing usable is left (the caller drops the tag).
    """
    prev = None
    while prev != value:
        prev = value
        value = _DELIM_RE.sub("", value)
    value = value.replace(TAG_SEP.strip(), ",")
    value = _WS_RE.sub(" ", value).strip()
    if len(value) > max_chars:
        value = value[:max_chars].rstrip()
    return value


def sanitize_tags(tags: Iterable[Tag], max_value_chars: int = MAX_VALUE_CHARS) -> List[Tag]:
    """Normalise keys and sanitise values; tags whose key or value ends up unusable are dropped."""
    out: List[Tag] = []
    for key, value in tags:
        key = normalize_key(str(key))
        value = sanitize_value(str(value), max_value_chars)
        if value and _KEY_RE.match(key) and len(key) <= MAX_KEY_CHARS:
            out.append((key, value))
    return out


# ---------------------------------------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------------------------------------


_KEY = int(Role.ANNOTATION_KEY)
_VALUE = int(Role.ANNOTATION_VALUE)
_OPEN_SEG = Segment(ANN_OPEN, Role.ANNOTATION_KEY, True)
_CLOSE_SEG = Segment(ANN_CLOSE, Role.ANNOTATION_KEY, True)
_new_segment = tuple.__new__  # NamedTuple's own __new__ is a Python-level call; this is the hot path


_TAG_SEGMENTS: Dict[Tag, Tuple[Segment, Segment, Segment]] = {}
_TAG_SEGMENTS_LIMIT = 500_000


def _tag_segments(tag: Tag) -> Tuple[Segment, Segment, Segment]:
    """``(key segment as the first tag, key segment after another tag, value segment)`` of one tag, memoised:
    tags repeat across a corpus, and reusing the same string objects also makes the tokenizer's cache lookups
    cheaper (a string's hash is computed once)."""
    try:
        return _TAG_SEGMENTS[tag]
    except KeyError:
        pass
    except TypeError:  # an unhashable tag (a list): build it, do not memoise
        return _build_tag_segments(tag)
    segs = _build_tag_segments(tag)
    if len(_TAG_SEGMENTS) < _TAG_SEGMENTS_LIMIT:
        _TAG_SEGMENTS[tag] = segs
    return segs


def _build_tag_segments(tag: Tag) -> Tuple[Segment, Segment, Segment]:
    key, value = tag
    return (
        _new_segment(Segment, (key + KV_SEP, _KEY, False)),
        _new_segment(Segment, (TAG_SEP + key + KV_SEP, _KEY, False)),
        _new_segment(Segment, (value, _VALUE, False)),
    )


def annotation_segments(tags: Sequence[Tag]) -> List[Segment]:
    """Segments of one annotation: delimiters, keys and separators are ANNOTATION_KEY, values ANNOTATION_VALUE.

    ``[("topic", "x"), ("genre", "y")]`` gives ``<|ann|>`` ``topic:`` ``x`` ``; genre:`` ``y`` ``<|/ann|>``.
    Tags must already be valid (see :func:`tag_problem`).
    """
    segs = [_OPEN_SEG]
    later = 0
    for tag in tags:
        first_key, next_key, value = _tag_segments(tag)
        segs.append(next_key if later else first_key)
        segs.append(value)
        later = 1
    segs.append(_CLOSE_SEG)
    return segs


def serialize_annotation(tags: Sequence[Tag]) -> str:
    """The text form of one annotation (what a model reads and writes)."""
    return "".join(s.text for s in annotation_segments(tags))


def chunk_segments(
    text: str, sep: str, tags: Optional[Sequence[Tag]], role: Role = Role.TEXT
) -> List[Segment]:
    """Segments for one chunk: its annotation (when it has tags) then its text and trailing separator.

    A chunk with no tags (``None`` or empty) gets no annotation block at all.
    """
    segs = annotation_segments(tags) if tags else []
    segs.append(_new_segment(Segment, (text + sep, int(role), False)))
    return segs


def render(segments: Iterable[Segment]) -> str:
    """The serialised text of segments (special tokens written as their literal text)."""
    return "".join(s.text for s in segments)


def parse_annotation(text: str) -> List[Tag]:
    """Parse the body of an annotation (the text between the delimiters, or with them) back into tags.

    Tolerant of spacing; pieces without a ``key:value`` shape are ignored.
    """
    text = text.strip()
    if text.startswith(ANN_OPEN):
        text = text[len(ANN_OPEN):]
    if text.endswith(ANN_CLOSE):
        text = text[: -len(ANN_CLOSE)]
    tags: List[Tag] = []
    for piece in text.split(TAG_SEP.strip()):
        key, colon, value = piece.partition(KV_SEP)
        if colon and key.strip() and value.strip():
            tags.append((normalize_key(key), value.strip()))
    return tags


def split_annotated_text(text: str) -> Tuple[List[List[Tag]], str]:
    """Separate a generated text into its annotations and the plain text with annotations removed.

    Inference uses this to return only the response and report the sampled annotation separately.
    """
    annotations = [parse_annotation(m.group(1)) for m in _ANNOTATION_RE.finditer(text)]
    plain = _ANNOTATION_RE.sub("", text)
    return annotations, plain
