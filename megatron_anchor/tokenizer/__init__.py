"""Tokenizers with the annotation delimiters as dedicated special tokens.

``build_tokenizer(tokenizer_type, tokenizer_model)`` returns an :class:`AnchorTokenizer` for a SentencePiece
model file or a Hugging Face ``tokenizer.json`` (file or folder, loaded offline). Ordinary text is always
encoded so that it can never produce a special token id: a document containing the literal text ``<|ann|>``
gets ordinary tokens for it, and only :meth:`AnchorTokenizer.encode_segments` emits the delimiter ids.
"""

import importlib
from typing import Optional, Type

from megatron_anchor.tokenizer.base import AnchorTokenizer
from megatron_anchor.tokenizer.errors import TokenizerError

_SP = "megatron_anchor.tokenizer.sentencepiece:SentencePieceAnchorTokenizer"
_HF = "megatron_anchor.tokenizer.hf:HuggingFaceAnchorTokenizer"
TOKENIZER_TYPES = {
    "SentencePieceTokenizer": _SP,
    "GPTSentencePieceTokenizer": _SP,
    "Llama2Tokenizer": _SP,
    "HuggingFaceTokenizer": _HF,
}
"""``--tokenizer-type`` values (Megatron-LM's names) and the class behind each (``module:Class``, imported on
first use so that a SentencePiece run never pays for importing ``tokenizers`` and the reverse): the one list
every tool and the trainer accept (the trainer adds ``NullTokenizer`` for pre-tokenized and mock data)."""


def _load(path: str) -> Type[AnchorTokenizer]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def tokenizer_class(tokenizer_type: str) -> Type[AnchorTokenizer]:
    """The class behind a ``--tokenizer-type`` value (imports its library)."""
    return _load(TOKENIZER_TYPES[tokenizer_type])


def __getattr__(name: str):
    """``HuggingFaceAnchorTokenizer`` and ``SentencePieceAnchorTokenizer``, imported when first asked for."""
    path = next((p for p in (_SP, _HF) if p.endswith(":" + name)), None)
    if path is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _load(path)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str, eod_token: Optional[str] = None,
                    **kwargs) -> AnchorTokenizer:
    """Load a tokenizer by Megatron-LM type name and model path; errors say which types exist.

    ``eod_token`` (``--eod-token``) names the end-of-document token; default: the model's own (SentencePiece
    ``eos``; a Hugging Face folder's ``eos_token`` or a known end-of-text token).
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(
            f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
        )
    if not tokenizer_model:
        raise TokenizerError(f"--tokenizer-model is required for {tokenizer_type}")
    return tokenizer_class(tokenizer_type)(tokenizer_model, eod_token=eod_token, **kwargs)


__all__ = [
    "AnchorTokenizer",
    "HuggingFaceAnchorTokenizer",
    "SentencePieceAnchorTokenizer",
    "TOKENIZER_TYPES",
    "TokenizerError",
    "build_tokenizer",
    "tokenizer_class",
]
