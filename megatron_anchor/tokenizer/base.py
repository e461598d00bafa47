"""The tokenizer interface shared by the data tools, the trainer and generation."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN, Segment
from megatron_anchor.roles import ROLE_DTYPE, Role

_ROUNDTRIP_PROBE = "Tokens  round-trip:\n\n\tcafé, 42 <|ann|> ☃ \n"
_KEY_CACHE_LIMIT = 100_000


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used as asked."""


class AnchorTokenizer(ABC):
    """Text <-> ids with ``<|ann|>``/``<|/ann|>`` and an end-of-document token as special tokens.

    Also satisfies what megatron-core's ``GPTDatasetConfig.tokenizer`` reads (``vocab_size``, ``eod``,
    ``pad``, ``tokenize``, ``detokenize``).
    """

    def __init__(self) -> None:
        self._key_cache: Dict[str, List[int]] = {}

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

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id."""

    @property
    @abstractmethod
    def ann_open(self) -> int:
        """Id of ``<|ann|>``."""

    @property
    @abstractmethod
    def ann_close(self) -> int:
        """Id of ``<|/ann|>``."""

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

    def _special_segment_id(self, text: str) -> int:
        ids = self.special_ids
        if text not in ids:
            raise TokenizerError(f"{text!r} is not a special token of this tokenizer")
        return ids[text]

    def eod_segment(self) -> Segment:
        """The end-of-document token as a segment (role EOD)."""
        return Segment(self.eod_text, Role.EOD, True)

    def encode_segments(
        self, docs: Sequence[Sequence[Segment]], segment_lengths: Optional[List[List[int]]] = None
    ) -> List[Tuple[np.ndarray, np.ndarray]]:
        """Tokenize documents given as segments; returns ``(ids, roles)`` arrays per document.

        Each segment is encoded on its own, so every token has exactly one role. Special segments become their
        single id. Annotation keys/separators repeat across a corpus and are cached; everything else is encoded
        in one batched call for all documents, which is what keeps this near the tokenizer's raw speed.
        If ``segment_lengths`` is a list, it receives each document's per-segment token counts.
        """
        todo: List[str] = []
        for segs in docs:
            for s in segs:
                if not s.special and s.role != Role.ANNOTATION_KEY:
                    todo.append(s.text)
        encoded = iter(self.encode_texts(todo)) if todo else iter(())
        cache = self._key_cache
        out: List[Tuple[np.ndarray, np.ndarray]] = []
        for segs in docs:
            id_parts: List[List[int]] = []
            role_parts: List[Tuple[int, int]] = []
            for s in segs:
                if s.special:
                    ids = [self._special_segment_id(s.text)]
                elif s.role == Role.ANNOTATION_KEY:
                    ids = cache.get(s.text)
                    if ids is None:
                        ids = self.encode_text(s.text)
                        if len(cache) < _KEY_CACHE_LIMIT:
                            cache[s.text] = ids
                else:
                    ids = next(encoded)
                id_parts.append(ids)
                role_parts.append((int(s.role), len(ids)))
            flat = [i for part in id_parts for i in part]
            ids_arr = np.array(flat, dtype=self.token_dtype)
            roles_arr = np.repeat(
                np.array([r for r, _ in role_parts], dtype=ROLE_DTYPE),
                np.array([n for _, n in role_parts], dtype=np.int64),
            )
            out.append((ids_arr, roles_arr))
            if segment_lengths is not None:
                segment_lengths.append([n for _, n in role_parts])
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
