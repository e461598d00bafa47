"""Documents as *pieces*, encoded a whole part at a time: the tokenizing core of every dataset tool.

A document is a sequence of pieces. A *text piece* is a run of ordinary text, encoded exactly as the tokenizer
encodes that string (so a run is never split into smaller encodes). A *pool piece* is a short, repeating piece
whose ids are computed once and kept: a special token, an annotation key (``topic:``, ``; genre:``) or a tag
value. Every piece has one role, so every token has one.

Encoding a part: all of its text pieces go to the tokenizer in one batched call (gigatoken when verified, see
:mod:`megatron_anchor.tokenizer.fast`); new pool pieces go in a second one; then ids and roles of every document
are gathered with a handful of numpy passes over the part's tokens (no Python work per token or per piece).
Time is linear in the part's tokens; memory is a few bytes per token of one part (ids, roles and one int64
gather index) plus the pool, which is cleared when it reaches :data:`POOL_LIMIT` pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN, KV_SEP, TAG_SEP, Segment, Tag
from megatron_anchor.roles import ROLE_DTYPE, Role
from megatron_anchor.tokenizer.errors import TokenizerError

POOL_LIMIT = 200_000
"""Pool pieces kept between parts; past this the pool starts afresh (the output never depends on it)."""

_ANNOTATION_ROLES = frozenset((int(Role.ANNOTATION_KEY), int(Role.ANNOTATION_VALUE)))


@dataclass
class PieceBatch:
    """The pieces of a part's documents, in order, as plain ints and strings (cheap to append to).

    ``codes`` holds one int per piece: a pool index (>= 0), or ``~k`` for the ``k``-th text piece.
    """

    codes: List[int] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)
    text_roles: List[int] = field(default_factory=list)
    doc_ends: List[int] = field(default_factory=list)
    """Number of pieces up to the end of each document."""
    meta: List[Any] = field(default_factory=list)
    """One value per document for the converter's own later checks (None when unused)."""

    def text(self, text: str, role: int = int(Role.TEXT)) -> None:
        """Append a text piece (skipped when empty: it has no tokens)."""
        if text:
            self.codes.append(~len(self.texts))
            self.texts.append(text)
            self.text_roles.append(role)

    def end_document(self, meta: Any = None) -> None:
        self.doc_ends.append(len(self.codes))
        self.meta.append(meta)

    def drop_open_document(self) -> None:
        """Forget the pieces added since the last finished document (it turned out to be bad)."""
        start = self.doc_ends[-1] if self.doc_ends else 0
        k = next((~c for c in self.codes[start:] if c < 0), len(self.texts))
        del self.codes[start:], self.texts[k:], self.text_roles[k:]


@dataclass
class EncodedPart:
    """A part's documents after encoding: flat token ids and roles, and where each document ends."""

    ids: np.ndarray
    roles: np.ndarray
    doc_lengths: np.ndarray
    """Tokens per document (int64)."""
    longest_text: np.ndarray
    """Per document, the token count of its longest TEXT piece (0 when it has none)."""
    meta: List[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def documents(self) -> List[Tuple[np.ndarray, np.ndarray]]:
        """``[(ids, roles), ...]`` per document, as views into the flat arrays."""
        ends = np.cumsum(self.doc_lengths).tolist()
        starts = [0] + ends[:-1]
        return [(self.ids[a:b], self.roles[a:b]) for a, b in zip(starts, ends)]

    def select(self, keep: Sequence[bool]) -> "EncodedPart":
        """The part with only the documents where ``keep`` is true."""
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        tokens = np.repeat(keep, self.doc_lengths)
        return EncodedPart(self.ids[tokens], self.roles[tokens], self.doc_lengths[keep], self.longest_text[keep],
                           [m for m, k in zip(self.meta, keep.tolist()) if k])

    @classmethod
    def from_documents(cls, docs: Sequence[Tuple[np.ndarray, np.ndarray]], dtype: type,
                       meta: Optional[List[Any]] = None) -> "EncodedPart":
        """Build a part from per-document arrays (converters that reshape documents, e.g. SFT packing)."""
        lengths = np.fromiter((len(i) for i, _ in docs), np.int64, len(docs))
        ids = np.concatenate([i for i, _ in docs]).astype(dtype, copy=False) if docs else np.zeros(0, dtype)
        roles = np.concatenate([r for _, r in docs]).astype(ROLE_DTYPE, copy=False) if docs else np.zeros(0, ROLE_DTYPE)
        return cls(ids, roles, lengths, np.zeros(len(docs), np.int64), list(meta or [None] * len(docs)))


def _gather(src: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """``src[starts[p]:starts[p] + lens[p]]`` for every piece ``p``, back to back."""
    total = int(lens.sum())
    # Token j of piece p comes from src[starts[p] + j].
    index = np.repeat(starts - (np.cumsum(lens) - lens), lens)
    index += np.arange(total, dtype=np.int64)
    return src[index]


class PieceEncoder:
    """Encodes :class:`PieceBatch` es for one tokenizer, keeping the pool of repeating pieces between parts."""

    def __init__(self, tok):
        self.tok = tok
        self._reset()

    def _reset(self) -> None:
        self._index: Dict[Tuple[int, str], int] = {}
        self._tags: Dict[Tag, Tuple[int, int, int]] = {}
        self._annotations: Dict[Tuple[Tag, ...], List[int]] = {}  # whole annotations: most repeat verbatim
        self.json_annotations: Dict[bytes, List[int]] = {}
        """Whole annotations by the JSON bytes of their ``tags`` list as the input spells it (equal JSON bytes are
        equal tags), for callers that read JSON: filled by the caller once it has validated the tags
        (:meth:`annotation_codes`); pool indices, so reset with the pool."""
        self._ids: List[np.ndarray] = []
        self._roles: List[int] = []
        self._pending: List[int] = []  # pool indices whose ids are not computed yet
        self._pending_texts: List[str] = []
        self._flat: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = None
        self.ann_open = self.special(ANN_OPEN, Role.ANNOTATION_KEY)
        self.ann_close = self.special(ANN_CLOSE, Role.ANNOTATION_KEY)
        self.eod = self.special(self.tok.eod_text, Role.EOD)

    # -- the pool ----------------------------------------------------------------------------------------
    def _add(self, ids: Optional[np.ndarray], role: int) -> int:
        self._ids.append(ids)
        self._roles.append(role)
        self._flat = None
        return len(self._ids) - 1

    def special(self, text: str, role: int) -> int:
        """Pool index of the special token spelled ``text``, with ``role`` (text spelling it elsewhere stays text)."""
        key = (~int(role), text)  # specials and ordinary pieces of the same text never share an entry
        idx = self._index.get(key)
        if idx is None:
            tid = self.tok.special_ids.get(text)
            if tid is None:
                raise TokenizerError(f"{text!r} is not a special token of this tokenizer")
            idx = self._index[key] = self._add(np.array([tid], np.int64), int(role))
        return idx

    def memo(self, text: str, role: int) -> int:
        """Pool index of an ordinary repeating piece (an annotation key or value); encoded on first use."""
        key = (int(role), text)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = self._add(None, int(role))
            self._pending.append(idx)
            self._pending_texts.append(text)
        return idx

    def pending_texts(self) -> List[str]:
        """Pool pieces registered but not encoded yet."""
        return list(self._pending_texts)

    def tag(self, tag: Tag) -> Tuple[int, int, int]:
        """``(key piece as the first tag, key piece after another tag, value piece)`` of one tag."""
        got = self._tags.get(tag)
        if got is None:
            key, value = tag
            got = (self.memo(key + KV_SEP, Role.ANNOTATION_KEY), self.memo(TAG_SEP + key + KV_SEP, Role.ANNOTATION_KEY),
                   self.memo(value, Role.ANNOTATION_VALUE))
            self._tags[tag] = got
        return got

    def annotation(self, tags: Sequence[Tag], codes: List[int]) -> None:
        """Append the pieces of one annotation (the serialisation of :mod:`megatron_anchor.annotation.format`)."""
        try:
            key = tuple(tags)
            known = self._annotations.get(key)
        except TypeError:  # tags given as lists: no whole-annotation memo
            key, known = None, None
        if known is not None:
            codes.extend(known)
            return
        start = len(codes)
        self._annotation_pieces(tags, codes)
        if key is not None:
            self._annotations[key] = codes[start:]

    def annotation_codes(self, tags: Sequence[Tag]) -> List[int]:
        """The pieces of one annotation as a new list (empty for no tags: an annotated chunk without tags)."""
        codes: List[int] = []
        if tags:
            self.annotation(tags, codes)
        return codes

    def _annotation_pieces(self, tags: Sequence[Tag], codes: List[int]) -> None:
        codes.append(self.ann_open)
        tag_pieces = self._tags
        later = False
        for t in tags:
            try:
                p = tag_pieces[t]
            except (KeyError, TypeError):  # a new tag, or one given as a list
                p = self.tag(tuple(t))
            codes.append(p[1] if later else p[0])
            codes.append(p[2])
            later = True
        codes.append(self.ann_close)

    def add_segments(self, batch: PieceBatch, segs: Sequence[Segment]) -> None:
        """Append segments (:mod:`megatron_anchor.annotation.format`) as pieces: specials and annotation pieces
        from the pool, any other text as a text piece."""
        for text, role, special in segs:
            role = int(role)
            if special:
                batch.codes.append(self.special(text, role))
            elif role in _ANNOTATION_ROLES:
                batch.codes.append(self.memo(text, role))
            else:
                batch.text(text, role)

    def _flush(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Encode pending pool pieces; return the pool as (ids, starts, lengths, roles) arrays."""
        if self._pending:
            ids, lengths = self.tok.encode_flat(self._pending_texts)
            pos = 0
            for idx, n in zip(self._pending, lengths.tolist()):
                self._ids[idx] = ids[pos:pos + n].astype(np.int64)
                pos += n
            self._pending, self._pending_texts = [], []
            self._flat = None
        if self._flat is None:
            lengths = np.fromiter(map(len, self._ids), np.int64, len(self._ids))
            starts = np.zeros(len(lengths), np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            self._flat = (np.concatenate(self._ids), starts, lengths, np.array(self._roles, ROLE_DTYPE))
        return self._flat

    # -- encoding ----------------------------------------------------------------------------------------
    def encode(self, batch: PieceBatch) -> EncodedPart:
        """Encode a batch; every document's ids and roles, back to back."""
        dtype = self.tok.token_dtype
        text_ids, text_lens = self.tok.encode_flat(batch.texts)
        pool_ids, pool_starts, pool_lens, pool_roles = self._flush()
        codes = np.array(batch.codes, np.int64)
        n_docs = len(batch.doc_ends)
        is_text = codes < 0
        k = ~codes[is_text]
        pool_k = codes[~is_text]
        lens = np.empty(len(codes), np.int64)
        roles = np.empty(len(codes), ROLE_DTYPE)
        lens[is_text] = text_lens[k]
        roles[is_text] = np.asarray(batch.text_roles, ROLE_DTYPE)[k] if len(k) else roles[is_text]
        lens[~is_text] = pool_lens[pool_k]
        roles[~is_text] = pool_roles[pool_k]
        if len(k) == len(text_lens) and (k == np.arange(len(k))).all():
            # Text pieces in the order they were added (what PieceBatch makes): their ids go out as one block into
            # the text tokens' places, and only pool tokens (annotations, EOD) are gathered. A byte mask and one
            # copy per token, where the general gather below builds and reads an int64 index per token.
            ids = np.empty(int(lens.sum()), dtype)
            text_tokens = np.repeat(is_text, lens)
            ids[text_tokens] = text_ids
            ids[~text_tokens] = _gather(pool_ids.astype(dtype, copy=False), pool_starts[pool_k], lens[~is_text])
        else:  # one source buffer: the part's text ids, then the pool's ids
            text_starts = np.zeros(len(text_lens), np.int64)
            if len(text_lens) > 1:
                np.cumsum(text_lens[:-1], out=text_starts[1:])
            starts = np.empty(len(codes), np.int64)
            starts[is_text] = text_starts[k]
            starts[~is_text] = pool_starts[pool_k] + len(text_ids)
            src = np.concatenate([text_ids.astype(dtype, copy=False), pool_ids.astype(dtype, copy=False)])
            ids = _gather(src, starts, lens)
        out_roles = np.repeat(roles, lens)
        piece_ends = np.asarray(batch.doc_ends, np.int64)
        token_ends = np.concatenate([[0], np.cumsum(lens)])[piece_ends]
        doc_lengths = np.diff(np.concatenate([[0], token_ends])) if n_docs else np.zeros(0, np.int64)
        text_len = np.where(roles == int(Role.TEXT), lens, 0)
        longest = np.zeros(n_docs, np.int64)
        if len(codes) and n_docs:
            doc_starts = np.concatenate([[0], piece_ends[:-1]])
            nonempty = piece_ends > doc_starts
            longest[nonempty] = np.maximum.reduceat(text_len, doc_starts[nonempty])
        if len(self._ids) > POOL_LIMIT or max(len(self._annotations), len(self.json_annotations)) > POOL_LIMIT:
            self._reset()
        return EncodedPart(ids, out_roles, doc_lengths.astype(np.int64), longest, list(batch.meta))
