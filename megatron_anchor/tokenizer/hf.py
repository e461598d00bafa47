"""Hugging Face ``tokenizers`` models (``--tokenizer-type HuggingFaceTokenizer``), loaded offline."""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

import tokenizers
from tokenizers import AddedToken, Tokenizer

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN
from megatron_anchor.tokenizer.base import AnchorTokenizer
from megatron_anchor.tokenizer.errors import TokenizerError

EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


def _eos_from_config(folder: str) -> Optional[str]:
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


class HuggingFaceAnchorTokenizer(AnchorTokenizer):
    """A ``tokenizer.json`` (or a folder holding one) with the delimiters as special tokens.

    Delimiters missing from the vocabulary are added as special tokens (new ids at the end). Encoding runs with
    ``encode_special_tokens`` on, so special-token text inside a document is split into ordinary tokens. A file
    that holds a delimiter or the end-of-document token as an ordinary token (in the model's vocabulary, or as a
    non-special added token) is refused, as the SentencePiece loader refuses ordinary pieces: document text would
    produce its id. The end-of-document token is ``eod_token`` if given, else the folder's ``eos_token``, else the
    first of :data:`EOD_CANDIDATES` in the vocabulary.
    """

    _reference_library = f"tokenizers {tokenizers.__version__}"

    def __init__(self, path: str, eod_token: Optional[str] = None, check_roundtrip: bool = True):
        super().__init__()
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerError(f"no Hugging Face tokenizer file at {file!r} (expected a tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises plain Exception on bad files
            raise TokenizerError(f"{file!r} is not a Hugging Face tokenizer.json: {e}") from None
        self.model_path = file
        missing = [t for t in (ANN_OPEN, ANN_CLOSE) if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self._tok.encode_special_tokens = True
        eod_token = eod_token or _eos_from_config(folder)
        if eod_token is None:
            eod_token = next((t for t in EOD_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        if eod_token is None or self._tok.token_to_id(eod_token) is None:
            raise TokenizerError(
                f"{file}: no end-of-document token found (tried {eod_token or ', '.join(EOD_CANDIDATES)}); "
                "add one to the tokenizer or name it with --eod-token"
            )
        self._eod_text = eod_token
        self._eod = self._tok.token_to_id(eod_token)
        self._ann_open = self._tok.token_to_id(ANN_OPEN)
        self._ann_close = self._tok.token_to_id(ANN_CLOSE)
        self._refuse_ordinary_specials(file)
        if check_roundtrip:
            self.check_roundtrip(file)

    def _refuse_ordinary_specials(self, file: str) -> None:
        """Raise TokenizerError when text could produce a special id: the token is not a special added token,
        or the model itself reaches it from text (e.g. a BPE merge that spells ``<|ann|>``)."""
        added = self._tok.get_added_tokens_decoder()
        specials = {ANN_OPEN: self._ann_open, ANN_CLOSE: self._ann_close, self._eod_text: self._eod}
        for text, tid in specials.items():
            token = added.get(tid)
            if token is None or not token.special:
                kind = "a non-special added token" if token is not None else "an ordinary token of the vocabulary"
                raise TokenizerError(
                    f"{file}: {text!r} (id {tid}) is {kind}, so document text would produce it; make it a special "
                    "added token (tools/train_tokenizer.py --type hf does this) or use a tokenizer without it")
        ids = set(specials.values())
        for text in specials:
            got = self._tok.encode(f"a {text} b{text}", add_special_tokens=False).ids
            if ids & set(got):
                raise TokenizerError(
                    f"{file}: the text {text!r} encodes to a special id ({sorted(ids & set(got))}): the model's "
                    "vocabulary or merges spell it; retrain the tokenizer without that piece")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod_text(self) -> str:
        return self._eod_text

    def fast_source(self) -> Optional[Tuple[str, str]]:
        return ("hf", self.model_path)

    def special_texts(self) -> List[str]:
        added = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        return sorted(set(added) | set(self.special_ids))

    def encode_texts(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
