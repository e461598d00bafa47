"""SentencePiece models (``--tokenizer-type SentencePieceTokenizer``)."""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import sentencepiece as spm

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN
from megatron_anchor.tokenizer.base import AnchorTokenizer
from megatron_anchor.tokenizer.errors import TokenizerError


class SentencePieceAnchorTokenizer(AnchorTokenizer):
    """A SentencePiece model whose delimiters are control symbols, or get ids appended after its vocabulary.

    Control symbols are never matched inside text, which is what makes the delimiters injection-safe. A model
    that holds a delimiter as an ordinary or user-defined piece is refused: text would produce its id.
    The end-of-document id is the model's ``eos`` id, or the piece named by ``eod_token`` (``--eod-token``).
    """

    _reference_library = f"sentencepiece {spm.__version__}"

    def __init__(self, model_path: str, num_threads: int = 1, check_roundtrip: bool = True,
                 eod_token: Optional[str] = None):
        super().__init__()
        if not os.path.isfile(model_path):
            raise TokenizerError(
                f"SentencePiece model {model_path!r} not found; train one with tools/train_tokenizer.py"
            )
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_path!r} is not a SentencePiece model: {e}") from None
        self._num_threads = num_threads
        n = self._sp.get_piece_size()
        self._control = {i for i in range(n) if self._sp.is_control(i)}
        extra: List[str] = []
        ids = {}
        for piece in (ANN_OPEN, ANN_CLOSE):
            pid = self._sp.piece_to_id(piece)
            if pid != self._sp.unk_id() and self._sp.id_to_piece(pid) == piece:
                if pid not in self._control:
                    raise TokenizerError(
                        f"{model_path}: {piece!r} is an ordinary piece, so document text would produce it; "
                        "retrain with it as a control symbol (tools/train_tokenizer.py does this)"
                    )
                ids[piece] = pid
            else:
                ids[piece] = n + len(extra)
                extra.append(piece)
        self._extra = extra
        self._ann_open, self._ann_close = ids[ANN_OPEN], ids[ANN_CLOSE]
        self._vocab_size = n + len(extra)
        if eod_token is not None:
            eod_id = self._sp.piece_to_id(eod_token)
            if eod_id == self._sp.unk_id() or self._sp.id_to_piece(eod_id) != eod_token:
                raise TokenizerError(f"{model_path}: --eod-token {eod_token!r} is not a piece of the model")
            self._eod = eod_id
        elif self._sp.eos_id() < 0:
            raise TokenizerError(f"{model_path}: the model has no eos id to use as end-of-document; name a piece "
                                 "with --eod-token")
        else:
            self._eod = self._sp.eos_id()
        self._specials = {self._ann_open: ANN_OPEN, self._ann_close: ANN_CLOSE}
        self._specials.update({i: self._sp.id_to_piece(i) for i in self._control})
        if check_roundtrip:
            self.check_roundtrip(model_path)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod_text(self) -> str:
        return self._sp.id_to_piece(self._eod)

    @property
    def pad(self) -> int:
        if self._sp.pad_id() < 0:
            raise AttributeError("SentencePiece model has no pad id")
        return self._sp.pad_id()

    def fast_source(self) -> Optional[Tuple[str, str]]:
        return ("sentencepiece", self.model_path)

    def special_texts(self) -> List[str]:
        return sorted(set(self._specials.values()) | set(self.special_ids))

    def encode_texts(self, texts: Sequence[str]) -> List[List[int]]:
        # SentencePiece never matches control symbols inside text, and appended ids are beyond its vocabulary.
        return self._sp.encode(list(texts), num_threads=self._num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        out: List[str] = []
        run: List[int] = []
        for i in ids:
            i = int(i)
            special = self._specials.get(i)
            if special is None:
                run.append(i)
                continue
            if run:
                out.append(self._sp.decode(run))
                run = []
            out.append(special)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)
