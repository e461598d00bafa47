"""What an input line means to the preprocessing engine: documents -> pieces, and checks on encoded parts.

A run's options (:class:`PreprocessConfig`) and per-part counts (:class:`PartStats`) live here, beside the
converters that read and fill them. :class:`DocumentConverter` is the pretraining converter (annotated or raw
documents); SFT preprocessing (:mod:`megatron_anchor.data.sft`) supplies its own. The engine that runs converters
over parts, in workers, with resume, is :mod:`megatron_anchor.data.preprocess`. Work and memory per document grow
with its length; nothing here holds more than the part being encoded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_anchor.annotation.budget import NO_BUDGET, AnnotationBudget
from megatron_anchor.annotation.default_annotator import ANNOTATOR_NAME, annotate_document
from megatron_anchor.annotation.format import Segment, annotation_segments
from megatron_anchor.annotation.schema import (
    Document,
    DocumentError,
    annotated_chunks,
    document_text,
    load_line,
    parse_document,
    parse_tags,
)
from megatron_anchor.bounds import bounded
from megatron_anchor.roles import Role
from megatron_anchor.tokenizer import AnchorTokenizer
from megatron_anchor.tokenizer.pieces import EncodedPart, PieceBatch, PieceEncoder

MAX_REASONS = 20
"""Reasons for skipped documents kept for the closing summary (the counts are exact)."""


@dataclass
class PreprocessConfig:
    """Options of a preprocessing run. Fields marked *output-affecting* are checked on resume."""

    input: str
    """JSONL (optionally .gz) with annotated (``chunks``) or raw (``json_key``) documents."""
    output_prefix: str
    """Outputs are ``<output_prefix>_<json_key>_document.{bin,idx}`` and the ``_roles`` channel beside them."""
    tokenizer_type: str
    """Megatron-LM tokenizer type name (output-affecting)."""
    tokenizer_model: str
    """SentencePiece model file or Hugging Face tokenizer.json / folder (output-affecting)."""
    json_key: str = "text"
    """Key holding a raw document's text (output-affecting)."""
    workers: int = bounded(1, ge=1)
    """Tokenizing processes."""
    append_eod: bool = False
    """Append the end-of-document token to each document (output-affecting)."""
    annotations: bool = True
    """Interleave annotations; False writes the same text without them (output-affecting)."""
    annotator: str = "default"
    """How to annotate raw documents: ``default`` (embedded) or ``none`` (raw documents are an error)."""
    skip_bad_documents: bool = False
    """Skip and count bad documents instead of stopping at the first (output-affecting)."""
    max_chunk_tokens: int = bounded(0, ge=0)
    """Reject chunks with more text tokens than this (e.g. the training sequence length); 0: no limit."""
    docs_per_part: int = bounded(2000, ge=1)
    """Input lines per part: the unit of parallel work and of resumption (output-affecting)."""
    eod_token: Optional[str] = None
    """End-of-document token text (default: the tokenizer's own; output-affecting)."""
    overwrite: bool = False
    """Replace existing outputs and discard parts left by a run with other arguments."""
    show_progress: bool = True
    """Show a tqdm progress bar."""
    num_shards: int = bounded(1, ge=1)
    """Split the input into this many shards by byte range (:mod:`megatron_anchor.sharding`); one run per shard."""
    shard_index: int = bounded(0, ge=0)
    """Which shard this run processes (0-based)."""
    converter: "DocumentConverter" = field(default_factory=lambda: DocumentConverter())
    """What an input line means (pretraining documents by default; SFT preprocessing passes its own)."""
    tokenizer_backend: str = "auto"
    """``auto`` (gigatoken when installed and identical for the model), ``gigatoken`` (required) or
    ``reference``. Never output-affecting: gigatoken is used only where it gives the reference's ids."""
    budget: AnnotationBudget = NO_BUDGET
    """Merge short chunks before the embedded annotator, cap tags per chunk (output-affecting)."""
    sample_bytes: int = bounded(64 << 10, ge=1)
    """Input read at start to check the fast backend's identity on the run's own texts."""

    @property
    def output_path_prefix(self) -> str:
        base = f"{self.output_prefix}_{self.json_key}_document"
        if self.num_shards > 1:
            return f"{base}.shard{self.shard_index:05d}-of-{self.num_shards:05d}"
        return base

    @property
    def done_marker(self) -> str:
        """Written beside a shard's outputs once they are complete; a rerun then skips the shard."""
        return self.output_path_prefix + ".done"

    @property
    def parts_dir(self) -> str:
        return self.output_path_prefix + ".parts"

    def fingerprint(self) -> Dict[str, object]:
        """What must match for a resumed run to reuse finished parts."""
        st = os.stat(self.input)
        with open(self.tokenizer_model if os.path.isfile(self.tokenizer_model)
                  else os.path.join(self.tokenizer_model, "tokenizer.json"), "rb") as f:
            tok_hash = hashlib.sha256(f.read()).hexdigest()
        return {
            "input": os.path.abspath(self.input), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns,
            "tokenizer_type": self.tokenizer_type, "tokenizer_sha256": tok_hash, "json_key": self.json_key,
            "append_eod": self.append_eod, "annotations": self.annotations, "annotator": self.annotator,
            "converter": self.converter.name, "converter_options": self.converter.fingerprint(),
            "skip_bad_documents": self.skip_bad_documents,
            "max_chunk_tokens": self.max_chunk_tokens, "docs_per_part": self.docs_per_part,
            "eod_token": self.eod_token, "num_shards": self.num_shards, "shard_index": self.shard_index,
            "budget": self.budget.fingerprint(),
        }


@dataclass
class PartStats:
    """Counts for one part (summed for the closing summary)."""

    documents: int = 0
    chunks: int = 0
    tokens: int = 0
    annotation_tokens: int = 0
    input_bytes: int = 0
    annotated_here: int = 0
    skipped: int = 0
    dropped: int = 0
    reasons: List[str] = field(default_factory=list)
    extra: Dict[str, int] = field(default_factory=dict)
    """Converter-specific counts (e.g. SFT: truncated, format-stability samples), summed like the rest."""

    def add(self, other: "PartStats") -> None:
        for name in ("documents", "chunks", "tokens", "annotation_tokens", "input_bytes", "annotated_here",
                     "skipped", "dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.extend(other.reasons[: max(0, MAX_REASONS - len(self.reasons))])
        for k, v in other.extra.items():
            self.extra[k] = self.extra.get(k, 0) + v

    def count(self, key: str, n: int = 1) -> None:
        """Add to a converter-specific count."""
        self.extra[key] = self.extra.get(key, 0) + n


class DocumentDropped(DocumentError):
    """A valid document that a converter leaves out by design (e.g. an SFT sample over the length limit).

    Unlike other document errors it never stops the run: it is counted in ``PartStats.dropped``.
    """


class DocumentConverter:
    """Turns input lines into pieces (:mod:`megatron_anchor.tokenizer.pieces`), and vets documents once encoded.

    The engine (parts, workers, resume, merge) is the same for every kind of input; a converter says what one
    line means. This one reads pretraining documents (annotated or raw); SFT preprocessing supplies its own,
    usually by overriding :meth:`segments` only. Converters run inside worker processes and must be picklable
    (plain attributes only).

    Token boundaries (docs/data_formats.md): a document is its runs of text, each encoded exactly as the
    tokenizer encodes that string, with boundaries forced only around annotations and before EOD. With
    ``--no-annotations`` a document is one run: its whole text encoded at once, then EOD, as Megatron-LM writes.
    """

    name = "pretrain"
    drop_reason = "by the converter"
    """Why documents are dropped by design (:class:`DocumentDropped`), for the summary when nothing is left."""

    def fingerprint(self) -> Dict[str, object]:
        """Converter options that change the output (checked when a run resumes)."""
        return {"default_annotator": ANNOTATOR_NAME, "runs": "canonical"}

    def dataset_facts(self) -> Dict[str, object]:
        """What the trainer must know about the written dataset (kept in its tokenizer record)."""
        return {"kind": self.name, "packed": False}

    def segments(self, line: bytes, where: str, cfg: "PreprocessConfig", tok: AnchorTokenizer,
                 stats: "PartStats") -> Tuple[List[Segment], int]:
        """``(segments, number of chunks)`` for one line; raise :class:`DocumentError` for bad input."""
        doc = self.document(line, where, cfg, stats)
        eod = tok.eod_segment() if cfg.append_eod else None
        return document_segments(doc, cfg.annotations, eod), len(doc.chunks)

    def document(self, line: bytes, where: str, cfg: "PreprocessConfig", stats: "PartStats") -> Document:
        """The validated document, annotated by the embedded annotator where needed, budget applied."""
        return self.parsed_document(load_line(line, where), where, cfg, stats)

    def parsed_document(self, obj, where: str, cfg: "PreprocessConfig", stats: "PartStats") -> Document:
        """:meth:`document` of an already decoded line."""
        doc = parse_document(obj, where, cfg.json_key)
        if cfg.annotations and not doc.annotated:
            if cfg.annotator != "default":
                raise DocumentError(
                    where, "raw document but --annotator none; annotate it first (tools/annotate.py), "
                    "use --annotator default, or pass --no-annotations"
                )
            cfg.budget.merge(doc)
            annotate_document(doc)
            stats.annotated_here += 1
        return cfg.budget.cap(doc)

    def add_document(self, line: bytes, where: str, cfg: "PreprocessConfig", tok: AnchorTokenizer,
                     batch: PieceBatch, stats: "PartStats") -> int:
        """Append one line's pieces to ``batch`` and end the document there; returns its number of chunks.

        The pretraining fast path: no segment objects, annotations straight from the pool. Converters that only
        override :meth:`segments` get it translated here."""
        enc = tok.pieces
        if type(self).segments is not DocumentConverter.segments:
            segs, n = self.segments(line, where, cfg, tok, stats)
            enc.add_segments(batch, segs)
            batch.end_document()
            return n
        if not cfg.annotations:
            text, n = document_text(load_line(line, where), where, cfg.json_key)
            batch.text(text)
        else:
            n = None if cfg.budget.active else _add_annotated(line, batch, enc)
            if n is None:  # not a well-formed annotated document: the general path says why, or annotates it
                batch.drop_open_document()
                n = self._add_document_slow(load_line(line, where), where, cfg, enc, batch, stats)
        if cfg.append_eod:
            batch.codes.append(enc.eod)
        batch.end_document()
        return n

    def _add_document_slow(self, obj, where: str, cfg: "PreprocessConfig", enc: PieceEncoder, batch: PieceBatch,
                           stats: "PartStats") -> int:
        """The pieces of a decoded line through :meth:`parsed_document`: raw documents (annotated here), the
        annotation budget, and every bad document (whose error this raises)."""
        doc = self.parsed_document(obj, where, cfg, stats)
        run: List[str] = []
        for c in doc.chunks:
            if c.tags:
                if run:
                    batch.text("".join(run))
                    run = []
                enc.annotation(c.tags, batch.codes)
            run.append(c.text)
            run.append(c.sep)
        batch.text("".join(run))
        return len(doc.chunks)

    def check_part(self, part: EncodedPart, wheres: List[str], cfg: "PreprocessConfig", stats: "PartStats",
                   reject) -> EncodedPart:
        """Return the part without the documents that fail a check; ``reject(i, error)`` is told of each
        (it raises, or counts, as the run's options say). Raise :class:`DocumentDropped` for by-design drops."""
        if not cfg.max_chunk_tokens:
            return part
        over = part.longest_text > cfg.max_chunk_tokens
        for i in np.flatnonzero(over).tolist():
            reject(i, DocumentError(
                wheres[i], f"a run of text between annotations has {int(part.longest_text[i])} tokens, more than "
                f"--max-chunk-tokens {cfg.max_chunk_tokens}; split the chunk or raise the limit"))
        return part.select(~over)

    def finish_part(self, part: EncodedPart, cfg: "PreprocessConfig", stats: "PartStats") -> EncodedPart:
        """Last look at a part's documents, in order, before they are written (SFT packs samples here)."""
        return part


def _no_where() -> str:
    return ""


def _add_annotated(line: bytes, batch: PieceBatch, enc: PieceEncoder) -> Optional[int]:
    """Append the pieces of a well-formed annotated line (every chunk tagged); its number of chunks.

    The hot loop of annotated preprocessing, one pass over chunks decoded by
    :func:`~megatron_anchor.annotation.schema.annotated_chunks` (typed structs whose tags stay raw JSON bytes),
    with no per-tag objects: a chunk's whole annotation is found by those bytes in the encoder's memo (decoded and
    validated by :func:`parse_tags` on first sight), so a repeated annotation costs one copy of its bytes and one
    dict probe. Returns None, leaving the pieces it added for the caller to drop, at the first thing it does not
    vouch for (not an annotated object, a chunk without tags, an empty text, a bad separator or tag): the general
    path then raises the exact error or handles the document. The pieces are those the general path makes
    (tests/data/test_fast_preprocess.py compares them)."""
    chunks = annotated_chunks(line)
    if not chunks:
        return None
    memo = enc.json_annotations
    codes, texts, roles = batch.codes, batch.texts, batch.text_roles
    text_role = int(Role.TEXT)
    run: List[str] = []
    for c in chunks:
        text, sep = c.text, c.sep
        if not text or (sep and not sep.isspace()):
            return None
        key = bytes(c.tags)
        ann = memo.get(key)
        if ann is None:
            if not key:  # no "tags": a raw chunk, for the general path
                return None
            tags = load_line(key, "")
            if type(tags) is not list:
                return None
            try:
                ann = enc.annotation_codes(parse_tags(tags, _no_where))
            except DocumentError:
                return None
            memo[key] = ann
        if ann:
            if run:
                codes.append(~len(texts))
                texts.append("".join(run))
                roles.append(text_role)
                run = []
            codes.extend(ann)
        run.append(text)
        run.append(sep)
    codes.append(~len(texts))
    texts.append("".join(run))
    roles.append(text_role)
    return len(chunks)


def document_segments(doc: Document, annotations: bool, eod: Optional[Segment]) -> List[Segment]:
    """A document's segments: each annotation (if wanted and present), the runs of text between them, EOD.

    Consecutive chunks without an annotation form one run of text, encoded in one piece."""
    segs: List[Segment] = []
    run: List[str] = []
    for c in doc.chunks:
        if annotations and c.tags:
            if run:
                segs.append(Segment("".join(run), Role.TEXT))
                run = []
            segs.extend(annotation_segments(c.tags))
        run.append(c.text + c.sep)
    segs.append(Segment("".join(run), Role.TEXT))
    if eod is not None:
        segs.append(eod)
    return segs
