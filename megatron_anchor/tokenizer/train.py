"""Train small tokenizers for experiments, with the annotation delimiters as special tokens."""

from __future__ import annotations

import io
import json
import os
from typing import Iterable, Iterator

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN

EOD_TOKEN_HF = "<|endoftext|>"


def train_sentencepiece(texts: Iterable[str], output_prefix: str, vocab_size: int, model_type: str = "bpe") -> str:
    """Train a lossless SentencePiece model (identity normalisation, no dummy prefix, byte fallback).

    The delimiters are control symbols, so text can never produce them; ``eos`` (id 1) is end-of-document.
    Returns the path of the ``.model`` file.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        control_symbols=[ANN_OPEN, ANN_CLOSE],
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16,
        hard_vocab_limit=False,  # a small corpus may not support the requested size: take what it supports
        unk_id=0,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    path = output_prefix + ".model"
    _atomic_write(path, model.getvalue())
    return path


def train_hf_bpe(texts: Iterable[str], output_dir: str, vocab_size: int) -> str:
    """Train a byte-level BPE ``tokenizer.json`` (lossless) with ``<|endoftext|>`` and the delimiters as specials.

    Writes ``output_dir/tokenizer.json`` and a ``tokenizer_config.json`` naming the eos token; returns the folder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN_HF, ANN_OPEN, ANN_CLOSE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    os.makedirs(output_dir, exist_ok=True)
    _atomic_write(os.path.join(output_dir, "tokenizer.json"), tok.to_str().encode("utf-8"))
    config = {"eos_token": EOD_TOKEN_HF, "additional_special_tokens": [ANN_OPEN, ANN_CLOSE]}
    _atomic_write(os.path.join(output_dir, "tokenizer_config.json"), json.dumps(config, indent=2).encode())
    return output_dir


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def iter_jsonl_texts(path: str, text_key: str = "text", max_bytes: int = 0) -> Iterator[str]:
    """Texts of a raw or annotated JSONL corpus (chunk texts for annotated lines), up to ``max_bytes``."""
    seen = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            if "chunks" in obj:
                text = "".join(c["text"] + c.get("sep", "") for c in obj["chunks"])
            else:
                text = obj[text_key]
            yield text
            seen += len(line)
            if max_bytes and seen >= max_bytes:
                return
