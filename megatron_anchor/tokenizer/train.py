"""Train small tokenizers for experiments, with the annotation delimiters as special tokens.

Bad input is an error naming the file (and line), never a tokenizer trained on nothing: an empty corpus, a
vocabulary below what the byte alphabet and the special tokens need, or (SentencePiece) below what the corpus's
characters need. A corpus too small for the requested size gives a smaller vocabulary, which
:func:`train_tokenizer` reports.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN
from megatron_anchor.bounds import bounded
from megatron_anchor.outputs import write_text

EOD_TOKEN_HF = "<|endoftext|>"
MIN_VOCAB = 256 + 3
"""The smallest vocabulary that holds the 256 byte pieces and the three special tokens."""
MAX_VOCAB = 1 << 20
"""The largest accepted (real vocabularies stay below 300k; the BPE trainer allocates per entry up front)."""


class TokenizerTrainingError(ValueError):
    """A corpus or setting no tokenizer can be trained from; the message names the file or flag."""


@dataclass
class TokenizerTrainConfig:
    """What ``tools/train_tokenizer.py`` trains."""

    input: str
    """JSONL corpus (raw ``{"text": ...}`` or annotated ``{"chunks": [...]}`` lines)."""
    output_prefix: str
    """SentencePiece: ``PREFIX.model``; hf: the folder ``PREFIX/``."""
    vocab_size: int = bounded(8000, ge=MIN_VOCAB, le=MAX_VOCAB)
    """Vocabulary size, special tokens included (a small corpus may support fewer: reported)."""
    type: str = "sentencepiece"
    """``sentencepiece`` or ``hf`` (byte-level BPE)."""
    model_type: str = "bpe"
    """SentencePiece algorithm: ``bpe`` or ``unigram``."""
    json_key: str = "text"
    """Key of a raw document's text."""
    max_bytes: int = bounded(50_000_000, ge=0)
    """Train on at most this many bytes of the corpus (0: all)."""
    skip_bad_documents: bool = False
    """Skip and count lines that are not documents, instead of stopping at the first."""
    skipped: List[str] = field(default_factory=list)
    """Filled by :func:`train_tokenizer`: where and why lines were skipped."""

    def outputs(self) -> List[str]:
        """The files training writes."""
        if self.type == "sentencepiece":
            return [self.output_prefix + ".model"]
        return [os.path.join(self.output_prefix, n) for n in ("tokenizer.json", "tokenizer_config.json")]


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
    write_text(path, model.getvalue())
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
    write_text(os.path.join(output_dir, "tokenizer.json"), tok.to_str())
    config = {"eos_token": EOD_TOKEN_HF, "additional_special_tokens": [ANN_OPEN, ANN_CLOSE]}
    write_text(os.path.join(output_dir, "tokenizer_config.json"), json.dumps(config, indent=2))
    return output_dir


def _document_text(line: bytes, where: str, text_key: str) -> str:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise TokenizerTrainingError(f"{where}: not a JSON document ({exc})") from None
    if not isinstance(obj, dict):
        raise TokenizerTrainingError(f"{where}: not a JSON object")
    if "chunks" in obj:
        chunks = obj["chunks"]
        if not isinstance(chunks, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                   for c in chunks):
            raise TokenizerTrainingError(f"{where}: 'chunks' must be a list of objects with a 'text'")
        return "".join(c["text"] + str(c.get("sep", "")) for c in chunks)
    text = obj.get(text_key)
    if not isinstance(text, str):
        raise TokenizerTrainingError(f"{where}: no text under {text_key!r} (and no 'chunks')")
    return text


def iter_jsonl_texts(path: str, text_key: str = "text", max_bytes: int = 0,
                     on_bad: Optional[Callable[[str], None]] = None) -> Iterator[str]:
    """Texts of a raw or annotated JSONL corpus (chunk texts for annotated lines), up to ``max_bytes``.

    A line that is not a document raises :class:`TokenizerTrainingError` naming ``file:line``, or, with
    ``on_bad``, is passed to it (as that message) and skipped."""
    seen = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = _document_text(line, f"{path}:{line_no}", text_key)
            except TokenizerTrainingError as exc:
                if on_bad is None:
                    raise
                on_bad(str(exc))
                continue
            yield text
            seen += len(line)
            if max_bytes and seen >= max_bytes:
                return


def train_tokenizer(cfg: TokenizerTrainConfig) -> Tuple[str, int]:
    """Train what ``cfg`` asks for; returns ``(written path, vocabulary size)``.

    Raises :class:`TokenizerTrainingError` for an empty corpus or a vocabulary the corpus cannot have; bad lines
    are skipped into ``cfg.skipped`` with ``skip_bad_documents``, else raise. Time is the trainer's (linear in
    ``max_bytes``); memory holds the sampled text."""
    from megatron_anchor.annotation.chunking import split_chunks

    kept = [0]

    def counted(texts: Iterable[str]) -> Iterator[str]:
        for t in texts:
            if t:
                kept[0] += 1
                yield t

    texts = counted(iter_jsonl_texts(cfg.input, cfg.json_key, cfg.max_bytes,
                                     cfg.skipped.append if cfg.skip_bad_documents else None))
    if cfg.type == "sentencepiece":
        # SentencePiece trains on "sentences": feed chunks (with their separators, so newlines are learned).
        chunks = (t + s for doc in texts for t, s in split_chunks(doc))
        try:
            out = train_sentencepiece(chunks, cfg.output_prefix, cfg.vocab_size, cfg.model_type)
        except RuntimeError as exc:
            raise _sentencepiece_error(cfg, str(exc), kept[0]) from None
        import sentencepiece as spm

        size = spm.SentencePieceProcessor(model_file=out).vocab_size()
    else:
        from tokenizers import Tokenizer

        # The BPE trainer takes an empty corpus without a word: look at the first text before training.
        first = next(texts, None)
        if first is None:
            raise _empty_corpus(cfg)
        out = train_hf_bpe(_chain(first, texts), cfg.output_prefix, cfg.vocab_size)
        size = Tokenizer.from_file(os.path.join(out, "tokenizer.json")).get_vocab_size()
    return out, size


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _empty_corpus(cfg: TokenizerTrainConfig) -> TokenizerTrainingError:
    why = f" ({len(cfg.skipped)} bad lines skipped)" if cfg.skipped else ""
    return TokenizerTrainingError(f"--input {cfg.input}: no text to train on{why}")


def _sentencepiece_error(cfg: TokenizerTrainConfig, message: str, documents: int) -> TokenizerTrainingError:
    if documents == 0 or "sentences_.empty()" in message:
        return _empty_corpus(cfg)
    need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if need:
        return TokenizerTrainingError(f"--vocab-size {cfg.vocab_size} is below what {cfg.input} needs: "
                                      f"{need.group(2)} pieces for its characters, the bytes and the special "
                                      "tokens; give at least that")
    return TokenizerTrainingError(f"SentencePiece could not train on {cfg.input}: {message.strip()[:300]}")
