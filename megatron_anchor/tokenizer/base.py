"""The tokenizer interface shared by the data tools, the trainer and generation."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from itertools import chain
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN, Segment
from megatron_anchor.roles import Role
from megatron_anchor.tokenizer.pieces import PieceBatch, PieceEncoder

_ROUNDTRIP_PROBE = "Tokens  round-trip:\n\n\tcafé, 42 <|ann|> ☃ \n"


class AnchorTokenizer(ABC):
    """Text <-> ids with ``<|ann|>``/``<|/ann|>`` and an end-of-document token as special tokens.

    Also satisfies what megatron-core's ``GPTDatasetConfig.tokenizer`` reads (``vocab_size``, ``eod``,
    ``pad``, ``tokenize``, ``detokenize``).
    """

    _eod: int
    _ann_open: int
    _ann_close: int
    _reference_library: str = "reference"

    def __init__(self) -> None:
        self._pieces: Optional[PieceEncoder] = None
        self._fast = None

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

        Each segment is encoded on its own, so every token has exactly one role; special segments become their
        single id. Annotation segments are memoised, all other text goes to the tokenizer in one batched call
        (see :mod:`megatron_anchor.tokenizer.pieces`). If ``segment_lengths`` is a list, it receives each
        document's per-segment token counts.
        """
        enc = self.pieces
        batch = PieceBatch()
        for segs in docs:
            enc.add_segments(batch, segs)
            batch.end_document()
        part = enc.encode(batch)
        out = part.documents()
        if segment_lengths is not None:
            for segs in docs:
                segment_lengths.append(self._segment_lengths(segs))
        return out

    def _segment_lengths(self, segs: Sequence[Segment]) -> List[int]:
        # Only for callers that ask (tests, inspection): encode segment by segment, no batching needed.
        return [1 if s.special else (len(self.encode_flat([s.text])[0]) if s.text else 0) for s in segs]

    # -- backends ----------------------------------------------------------------------------------------
    @property
    def pieces(self) -> PieceEncoder:
        """This tokenizer's piece encoder (the pool of repeating pieces lives there)."""
        if self._pieces is None:
            self._pieces = PieceEncoder(self)
        return self._pieces

    def encode_flat(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: all texts' ids back to back and each text's count; the fast backend when attached."""
        if self._fast is not None:
            return self._fast.encode_flat(texts)
        lists = self.encode_texts(texts)
        lengths = np.fromiter(map(len, lists), np.int64, len(lists))
        return np.fromiter(chain.from_iterable(lists), np.int64, int(lengths.sum())), lengths

    def encode_texts_reference(self, texts: Sequence[str]) -> List[List[int]]:
        """The reference library's ids (what the fast backend is checked against)."""
        return self.encode_texts(texts)

    def attach_fast(self, encoder) -> None:
        """Encode with ``encoder`` from now on (:func:`megatron_anchor.tokenizer.fast.select_backend` decides)."""
        self._fast = encoder

    @property
    def backend_name(self) -> str:
        """What encodes text: ``gigatoken`` or the reference library."""
        return "gigatoken" if self._fast is not None else self.reference_name

    @property
    def reference_name(self) -> str:
        """The reference library and its version, e.g. ``tokenizers 0.21.0``."""
        return self._reference_library

    def fast_source(self) -> Optional[Tuple[str, str]]:
        """``(format, path)`` the fast backend loads this model from (``hf`` or ``sentencepiece``), or None."""
        return None

    def special_texts(self) -> List[str]:
        """Texts of every special token of the model (the delimiters and EOD included)."""
        return list(self.special_ids)

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
