"""The tokenizer interface shared by the data tools, the trainer and generation."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
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
        self._special_map: Optional[Dict[str, int]] = None

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
        what keeps this near the tokenizer's raw speed.
        If ``segment_lengths`` is a list, it receives each document's per-segment token counts.
        """
        specials = self._special_map
        if specials is None:
            specials = self._special_map = self.special_ids
        cache = self._key_cache
        misses: Dict[str, int] = {}
        texts: List[str] = []
        for segs in docs:
            for text, role, special in segs:
                if special:
                    continue
                if role in _CACHED_ROLES:
                    if text not in cache and text not in misses:
                        misses[text] = len(misses)
                else:
                    texts.append(text)
        miss_list = list(misses)
        encoded = self.encode_texts(miss_list + texts) if (miss_list or texts) else []
        local = dict(zip(miss_list, encoded))
        if len(cache) + len(local) <= _KEY_CACHE_LIMIT:
            cache.update(local)
        text_ids = iter(encoded[len(miss_list):])
        out: List[Tuple[np.ndarray, np.ndarray]] = []
        for segs in docs:
            flat: List[int] = []
            role_codes: List[int] = []
            counts: List[int] = []
            for text, role, special in segs:
                if special:
                    if text not in specials:
                        raise TokenizerError(f"{text!r} is not a special token of this tokenizer")
                    flat.append(specials[text])
                    n = 1
                else:
                    if role in _CACHED_ROLES:
                        ids = cache.get(text)
                        if ids is None:
                            ids = local[text]
                    else:
                        ids = next(text_ids)
                    flat.extend(ids)
                    n = len(ids)
                role_codes.append(role)
                counts.append(n)
            ids_arr = np.array(flat, dtype=self.token_dtype)
            roles_arr = np.repeat(np.array(role_codes, dtype=ROLE_DTYPE), counts)
            out.append((ids_arr, roles_arr))
            if segment_lengths is not None:
                segment_lengths.append(counts)
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
