"""Tokenizers with the annotation delimiters as dedicated special tokens.

``build_tokenizer(tokenizer_type, tokenizer_model)`` returns an :class:`AnchorTokenizer` for a SentencePiece
model file or a Hugging Face ``tokenizer.json`` (file or folder, loaded offline). Ordinary text is always
encoded so that it can never produce a special token id: a document containing the literal text ``<|ann|>``
gets ordinary tokens for it, and only :meth:`AnchorTokenizer.encode_segments` emits the delimiter ids.
"""

from typing import Optional

from megatron_anchor.tokenizer.base import AnchorTokenizer, TokenizerError
from megatron_anchor.tokenizer.hf import HuggingFaceAnchorTokenizer
from megatron_anchor.tokenizer.sentencepiece import SentencePieceAnchorTokenizer

TOKENIZER_TYPES = {
    "SentencePieceTokenizer": SentencePieceAnchorTokenizer,
    "GPTSentencePieceTokenizer": SentencePieceAnchorTokenizer,
    "Llama2Tokenizer": SentencePieceAnchorTokenizer,
    "HuggingFaceTokenizer": HuggingFaceAnchorTokenizer,
}
"""``--tokenizer-type`` values (Megatron-LM's names) and the class behind each: the one list every tool and the
trainer accept (the trainer adds ``NullTokenizer`` for pre-tokenized and mock data)."""


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
    return TOKENIZER_TYPES[tokenizer_type](tokenizer_model, eod_token=eod_token, **kwargs)


__all__ = [
    "AnchorTokenizer",
    "HuggingFaceAnchorTokenizer",
    "SentencePieceAnchorTokenizer",
    "TOKENIZER_TYPES",
    "TokenizerError",
    "build_tokenizer",
]
