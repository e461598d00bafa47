"""What an input line means to the preprocessing engine: documents -> pieces, and checks on encoded parts.

:class:`DocumentConverter` is the pretraining converter (annotated or raw documents); SFT preprocessing
(:mod:`megatron_anchor.data.sft`) supplies its own. The engine that runs converters over parts, in workers, with
resume, is :mod:`megatron_anchor.data.preprocess`. Work and memory per document grow with its length; nothing here
holds more than the part being encoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

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
from megatron_anchor.roles import Role
from megatron_anchor.tokenizer import AnchorTokenizer
from megatron_anchor.tokenizer.pieces import EncodedPart, PieceBatch, PieceEncoder

if TYPE_CHECKING:  # only annotations: the engine imports this module
    from megatron_anchor.data.preprocess import PartStats, PreprocessConfig


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
    (tests/test_fast_preprocess.py compares them)."""
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
