"""Tokenizer files for an exported folder: ``tokenizer.json`` (Hugging Face ``tokenizers``) and its configs.

A ``HuggingFaceTokenizer`` run already has a tokenizer.json: it is copied. A SentencePiece BPE model (what
``tools/train_tokenizer.py`` writes) is rebuilt as an equivalent ``tokenizers`` BPE: the same pieces and ids,
merges ordered by the score of the piece they produce (SentencePiece BPE merges the best-scoring piece first),
whitespace as ``▁``, byte fallback. SentencePiece's BPE encoder does not split text into words: it merges over the
whole text, and only the vocabulary keeps pieces inside words. So the conversion must not split either: a
pre-tokenizer that cuts before every ``▁`` could never produce the whitespace-only pieces (``▁▁▁▁``) that
``allow_whitespace_only_pieces`` models learn from indented text, verse and code. :func:`check_equivalent` verifies that both give the same
ids and text on sample texts; export fails rather than ship a tokenizer that disagrees with training.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Sequence

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN

WORD = "\u2581"  # SentencePiece's whitespace mark


class TokenizerExportError(ValueError):
    """The tokenizer cannot be written as an equivalent tokenizer.json."""


def sentencepiece_to_tokenizers(model_path: str):
    """A ``tokenizers.Tokenizer`` equivalent to a lossless SentencePiece BPE model (identity normalisation)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    sp = spm.SentencePieceProcessor()
    sp.Load(model_path)
    n = sp.get_piece_size()
    vocab: Dict[str, int] = {sp.id_to_piece(i): i for i in range(n)}
    specials = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    ordinary = {sp.id_to_piece(i): i for i in range(n) if i not in specials and not sp.is_byte(i)}
    merges = []
    for piece, pid in ordinary.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ordinary and right in ordinary:
                merges.append((-sp.get_score(pid), pid, ordinary[left], left, right))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=sp.id_to_piece(sp.unk_id()),
                     fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD, prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(WORD, " "), decoders.ByteFallback(), decoders.Fuse()])
    extra = [t for t in (ANN_OPEN, ANN_CLOSE) if t not in vocab]
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in specials]
                           + [AddedToken(t, special=True, normalized=False) for t in extra])
    return tok


def check_equivalent(anchor_tok, hf_tok, texts: Sequence[str]) -> None:
    """Raise :class:`TokenizerExportError` unless both tokenizers give the same ids and decode the same."""
    for text in texts:
        ours = anchor_tok.encode_text(text)
        theirs = hf_tok.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise TokenizerExportError(
                f"exported tokenizer disagrees with the training tokenizer on {text[:60]!r}: first difference at "
                f"token {at} ({ours[at:at + 4]} vs {theirs[at:at + 4]})")
        with_specials = [anchor_tok.ann_open] + ours + [anchor_tok.ann_close, anchor_tok.eod]
        if hf_tok.decode(with_specials, skip_special_tokens=False) != anchor_tok.decode(with_specials):
            raise TokenizerExportError(f"exported tokenizer decodes {text[:60]!r} differently")


def write_tokenizer(anchor_tok, tokenizer_type: str, out_dir: str, check_texts: Sequence[str] = ()) -> List[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``; returns the files.

    The delimiters are special tokens of the written tokenizer (``additional_special_tokens``), with the same
    ids as in training; the end-of-document token is ``eos_token``. ``split_special_tokens`` makes transformers
    (and vLLM, which tokenizes through it) encode text that spells a special token as ordinary tokens, as
    training does: the delimiter ids only ever come from token-id prompts. The written folder is loaded back by
    :class:`~megatron_anchor.tokenizer.HuggingFaceAnchorTokenizer`, which refuses it if text could reach a
    special id.
    """
    from tokenizers import Tokenizer

    path = os.path.join(out_dir, "tokenizer.json")
    if tokenizer_type == "HuggingFaceTokenizer":
        shutil.copyfile(anchor_tok.model_path, path)
        hf = Tokenizer.from_file(path)
        for t, i in ((ANN_OPEN, anchor_tok.ann_open), (ANN_CLOSE, anchor_tok.ann_close)):
            if hf.token_to_id(t) != i:
                raise TokenizerExportError(f"{anchor_tok.model_path}: {t} is not a token of the file with id {i}")
    else:
        hf = sentencepiece_to_tokenizers(anchor_tok.model_path)
        hf.save(path)
    check_equivalent(anchor_tok, Tokenizer.from_file(path), list(check_texts) + [
        "Hello world.\n\nA second  paragraph, with 42 digits and café.", "  leading spaces\tand tabs\n"])
    eos = anchor_tok.eod_text
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "additional_special_tokens": [ANN_OPEN, ANN_CLOSE],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": 1 << 20,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": eos, "additional_special_tokens": [ANN_OPEN, ANN_CLOSE]}, f, indent=2)
    from megatron_anchor.tokenizer import HuggingFaceAnchorTokenizer, TokenizerError

    try:
        HuggingFaceAnchorTokenizer(out_dir, check_roundtrip=False)
    except TokenizerError as exc:
        raise TokenizerExportError(f"the exported tokenizer is unsafe: {exc}") from None
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
