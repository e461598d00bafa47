"""The tokenizer interface shared by the data tools, the trainer and generation."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from itertools import accumulate, chain, compress, repeat
from operator import is_
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN, Segment
from megatron_anchor.roles import ROLE_DTYPE, Role

_ROUNDTRIP_PROBE = "Tokens  round-trip:\n\n\tcafé, 42 <|ann|> ☃ \n"
_KEY_CACHE_LIMIT = 200_000
# Plain ints: hashing an IntEnum member is a Python-level call, and this set is probed once per segment.
_CACHED_ROLES = frozenset((int(Role.ANNOTATION_KEY), int(Role.ANNOTATION_VALUE)))


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used as asked."""


class AnchorTokenizer(ABC):
    """Text <-> ids with ``<|ann|>``/``<|/ann|>`` and an end-of-document token as special tokens.

    Also satisfies what megatron-core's ``GPTDatasetConfig.tokenizer`` reads (``vocab_size``, ``eod``,
    ``pad``, ``tokenize``, ``detokenize``).
    """

    _eod: int
    _ann_open: int
    _ann_close: int

    def __init__(self) -> None:
        self._key_cache: Dict[str, List[int]] = {}
        self._special_map: Optional[Dict[str, List[int]]] = None

    # -- what subclasses provide -------------------------------------------------------------------------
    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode ordinary texts; never yields a special-token id, whatever the text contains."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids; special tokens are written as their literal text."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the trainer pads this for tensor parallelism)."""

    # Subclasses set ``_eod``, ``_ann_open`` and ``_ann_close`` when they load their model.
    @property
    def eod(self) -> int:
        """End-of-document id."""
        return self._eod

    @property
    def ann_open(self) -> int:
        """Id of ``<|ann|>``."""
        return self._ann_open

    @property
    def ann_close(self) -> int:
        """Id of ``<|/ann|>``."""
        return self._ann_close

    @property
    @abstractmethod
    def eod_text(self) -> str:
        """Literal text that :meth:`decode` writes for the end-of-document token."""

    # -- shared behaviour --------------------------------------------------------------------------------
    @property
    def special_ids(self) -> Dict[str, int]:
        """Special token text -> id."""
        return {ANN_OPEN: self.ann_open, ANN_CLOSE: self.ann_close, self.eod_text: self.eod}

    @property
    def pad(self) -> int:
        """No dedicated padding id: megatron-core then pads with an id that never occurs in data."""
        raise AttributeError("tokenizer has no pad id")

    @property
    def unique_identifiers(self) -> Dict[str, object]:
        """What megatron-core's dataset cache key records about the tokenizer."""
        return {"class": type(self).__name__, "model": getattr(self, "model_path", None),
                "vocab_size": self.vocab_size, "eod": self.eod}

    @property
    def token_dtype(self) -> type:
        """Smallest dtype megatron-core's IndexedDataset uses for these ids (uint16 below 65500, else int32)."""
        return np.uint16 if self.vocab_size < 65500 else np.int32

    def encode_text(self, text: str) -> List[int]:
        """Encode one ordinary text (injection-safe)."""
        return self.encode_texts([text])[0]

    def tokenize(self, text: str) -> List[int]:
        """megatron-core name for :meth:`encode_text`."""
        return self.encode_text(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """megatron-core name for :meth:`decode`."""
        return self.decode(ids)

    def eod_segment(self) -> Segment:
        """The end-of-document token as a segment (role EOD)."""
        return Segment(self.eod_text, Role.EOD, True)

    def encode_segments(
        self, docs: Sequence[Sequence[Segment]], segment_lengths: Optional[List[List[int]]] = None
    ) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Tokenize documents given as segments; returns ``(ids, roles)`` arrays per document.

        Each segment is encoded on its own, so every token has exactly one role. Special segments become their
        single id. Annotation segments (keys, separators, values) repeat across a corpus and are cached; all
        other text, and the cache misses, go to the tokenizer in one batched call for all documents, which is
        what keeps this near the tokenizer's raw speed. The bookkeeping runs over all segments of all
        documents at once, in C-level passes (``map``, ``zip``, numpy) rather than a Python loop per segment.
        If ``segment_lengths`` is a list, it receives each document's per-segment token counts.
        """
        specials = self._special_map
        if specials is None:
            specials = self._special_map = {t: [i] for t, i in self.special_ids.items()}
        cache = self._key_cache
        flat = [seg for segs in docs for seg in segs]
        if not flat:
            if segment_lengths is not None:
                segment_lengths.extend([] for _ in docs)
            return [(np.zeros(0, self.token_dtype), np.zeros(0, ROLE_DTYPE)) for _ in docs]
        texts, roles, special = zip(*flat)
        # Cached annotation pieces first, then the special segments' ids over whatever the cache said for their
        # text (a special is looked up only among the special tokens, so text that spells one never becomes its
        # id, nor an annotation value its special id); everything still None is encoded below.
        pieces: List[Optional[List[int]]] = list(map(cache.get, texts))
        for i in compress(range(len(texts)), special):
            ids = specials.get(texts[i])
            if ids is None:
                raise TokenizerError(f"{texts[i]!r} is not a special token of this tokenizer")
            pieces[i] = ids
        todo = list(compress(range(len(pieces)), map(is_, pieces, repeat(None))))
        if todo:
            # Annotation pieces not cached yet are encoded once each; ordinary text is encoded as it comes.
            new_pieces: Dict[str, Optional[List[int]]] = {}
            text_todo: List[int] = []
            for i in todo:
                if roles[i] in _CACHED_ROLES:
                    new_pieces[texts[i]] = None
                else:
                    text_todo.append(i)
            encoded = self.encode_texts(list(new_pieces) + [texts[i] for i in text_todo])
            new_pieces = dict(zip(new_pieces, encoded))
            for i, ids in zip(text_todo, encoded[len(new_pieces):]):
                pieces[i] = ids
            if new_pieces:
                for i in todo:
                    if pieces[i] is None:
                        pieces[i] = new_pieces[texts[i]]
                if len(cache) < _KEY_CACHE_LIMIT:
                    cache.update(new_pieces)
        lengths = list(map(len, pieces))
        all_ids = np.fromiter(chain.from_iterable(pieces), dtype=self.token_dtype, count=sum(lengths))
        all_roles = np.repeat(np.array(roles, dtype=ROLE_DTYPE), lengths)
        seg_ends = list(accumulate(map(len, docs)))
        token_ends = list(accumulate(lengths))
        out: List[Tuple[np.ndarray, np.ndarray]] = []
        seg_start = tok_start = 0
        for seg_end in seg_ends:
            tok_end = token_ends[seg_end - 1] if seg_end else 0
            out.append((all_ids[tok_start:tok_end], all_roles[tok_start:tok_end]))
            if segment_lengths is not None:
                segment_lengths.append(lengths[seg_start:seg_end])
            seg_start, tok_start = seg_end, tok_end
        return out

    def check_roundtrip(self, source: str) -> Optional[str]:
        """Warn (and return the reason) when this tokenizer cannot give text back exactly.

        Exact round trips need a lossless model (no normalisation, no added prefix space). Data prepared with a
        lossy one still trains, but ``decode(tokens)`` will not equal the serialised text.
        """
        got = self.decode(self.encode_text(_ROUNDTRIP_PROBE))
        if got != _ROUNDTRIP_PROBE:
            reason = (
                f"tokenizer {source} does not round-trip text exactly ({_ROUNDTRIP_PROBE!r} -> {got!r}); "
                "train one with tools/train_tokenizer.py for exact round trips"
            )
            warnings.warn(reason, stacklevel=2)
            return reason
        return None
