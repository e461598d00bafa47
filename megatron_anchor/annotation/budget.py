"""The annotation budget: how many tokens annotations take, and the two options that shrink it.

Annotation tokens replace content tokens in a fixed token budget. On text with many short paragraphs they can
reach a third of all tokens (five tags on a two-line paragraph cost about as much as the paragraph). Two options,
shared by ``tools/annotate.py`` and the embedded annotator of ``tools/preprocess_data.py``:

- ``merge_below_chars``: before annotation, a chunk shorter than this is merged with the chunks after it (their
  blank-line separators kept inside the merged text) until the merged chunk reaches the size or a chunk that
  already has tags comes; the last chunks of a document may stay below it. Only chunks without tags merge, so
  annotated input is never rewritten.
- ``max_tags``: keep only the first N tags of every chunk (annotators write the most salient first).

Both default to 0 (off): the paper's behaviour, every blank-line chunk annotated with every tag it gets.
Both are linear in the document's size and keep ``"".join(text + sep)`` equal to the original document.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from megatron_anchor import bounds
from megatron_anchor.annotation.schema import Chunk, Document
from megatron_anchor.bounds import bounded

_FLAGS = {"merge_below_chars": "--merge-chunks-below", "max_tags": "--max-tags-per-chunk"}


@dataclass(frozen=True)
class AnnotationBudget:
    """Options that trade annotation density for content tokens (0 everywhere: the paper's behaviour)."""

    merge_below_chars: int = bounded(0, ge=0)
    """Merge consecutive chunks without tags while the merged chunk is shorter than this many characters."""
    max_tags: int = bounded(0, ge=0)
    """Keep at most this many tags per chunk, the first ones (0: all)."""

    def __post_init__(self) -> None:
        bounds.check(self, ValueError, flag_of=_FLAGS.get)

    @property
    def active(self) -> bool:
        return bool(self.merge_below_chars or self.max_tags)

    def fingerprint(self) -> Dict[str, int]:
        """The options, for a resumed run's check."""
        return asdict(self)

    def merge(self, doc: Document) -> Document:
        """Merge short chunks that have no tags yet (in place; returns ``doc``)."""
        limit = self.merge_below_chars
        if not limit or len(doc.chunks) < 2:
            return doc
        out = [doc.chunks[0]]
        for c in doc.chunks[1:]:
            last = out[-1]
            if last.tags is None and c.tags is None and len(last.text) < limit:
                out[-1] = Chunk(last.text + last.sep + c.text, c.sep, None)
            else:
                out.append(c)
        doc.chunks = out
        return doc

    def cap(self, doc: Document) -> Document:
        """Cut every chunk's tags to ``max_tags`` (in place; returns ``doc``)."""
        n = self.max_tags
        if n:
            for c in doc.chunks:
                if c.tags is not None and len(c.tags) > n:
                    c.tags = c.tags[:n]
        return doc


NO_BUDGET = AnnotationBudget()
"""The default: every blank-line chunk, every tag."""


def add_budget_arguments(group) -> None:
    """``--merge-chunks-below`` and ``--max-tags-per-chunk`` (the same flags in every tool that annotates)."""
    group.add_argument("--merge-chunks-below", metavar="CHARS", **bounds.argument(
        AnnotationBudget, "merge_below_chars",
        "before annotation, merge a chunk shorter than CHARS characters with the chunks after it (their blank lines "
        "kept) until it reaches CHARS, so short paragraphs share one annotation; chunks that already have tags never "
        "merge (default 0: every blank-line chunk, as in the paper)"))
    group.add_argument("--max-tags-per-chunk", metavar="N", **bounds.argument(
        AnnotationBudget, "max_tags", "keep only the first N tags of each chunk (default 0: all)"))


def budget_from_args(args) -> AnnotationBudget:
    """The budget named by :func:`add_budget_arguments`' flags."""
    return AnnotationBudget(args.merge_chunks_below, args.max_tags_per_chunk)
