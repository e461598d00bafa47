"""What the annotate job (:mod:`megatron_anchor.annotation.annotate`) is given and what it reports: its
configuration, its error, its counters and their closing summary. Nothing here does I/O; memory is one
:class:`Stats` (a few dozen counters and one entry per failure reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_anchor.annotation.budget import NO_BUDGET, AnnotationBudget
from megatron_anchor.annotation.llm.client import ClientConfig
from megatron_anchor.bounds import bounded


class AnnotateError(RuntimeError):
    """A job that cannot start or continue (bad arguments, a progress file for another input, ...)."""


@dataclass
class AnnotateConfig:
    """Everything the annotate job needs. ``tools/annotate.py`` maps its flags onto these fields."""

    input: Path
    """Raw (``{"text": ...}``) or partly annotated JSONL."""
    output: Path
    """Annotated JSONL; side files are named after it."""
    annotator: str = "default"
    """``default`` (embedded, no server), ``vllm`` (OpenAI-compatible servers at ``client.urls``) or
    ``distilled:PATH`` (a model written by ``tools/distill_annotator.py``; no server)."""
    client: Optional[ClientConfig] = None
    """Server settings for ``vllm``."""
    schema_path: Optional[Path] = None
    """Tag schema file (None: the packaged default; for ``distilled:PATH``, the schema the model was trained for,
    and a given file must be that schema)."""
    cache_path: Optional[Path] = None
    """SQLite cache (None: ``OUTPUT.cache.sqlite``)."""
    use_cache: bool = True
    """Look chunks up in / store them into the cache."""
    text_key: str = "text"
    """Field holding a raw document's text."""
    window: int = bounded(0, ge=0)
    """Chunk requests allowed in flight before reading stops (0: four times the concurrency)."""
    checkpoint_every_s: float = bounded(2.0, gt=0)
    """Seconds between checkpoints (each costs an fsync of both outputs)."""
    overwrite: bool = False
    """Start from scratch even when a checkpoint or an output exists."""
    progress: bool = True
    """Show a tqdm bar on stderr."""
    limit: Optional[int] = bounded(None, ge=1)
    """Stop after this many input lines (for trials)."""
    num_shards: int = bounded(1, ge=1)
    """Process only shard ``shard_index`` of this many byte-range shards of the input
    (:mod:`megatron_anchor.sharding`); ``output`` is then that shard's own output."""
    shard_index: int = bounded(0, ge=0)
    """Which shard (0-based)."""
    budget: AnnotationBudget = NO_BUDGET
    """Merge short chunks before annotation, cap tags per chunk (:mod:`megatron_anchor.annotation.budget`)."""

    @property
    def failed_path(self) -> Path:
        return Path(str(self.output) + ".failed.jsonl")

    @property
    def progress_path(self) -> Path:
        return Path(str(self.output) + ".progress.json")


@dataclass
class Stats:
    """Counters over the whole job (a resumed run continues the checkpoint's)."""

    lines: int = 0
    documents: int = 0
    documents_failed: int = 0
    chunks: int = 0
    annotated: int = 0
    """Chunks annotated by the server (or the embedded annotator) in this job."""
    cached: int = 0
    """Chunks served from the cache, or shared with an identical chunk annotated at the same time."""
    pretagged: int = 0
    """Chunks that already had tags in the input (kept as they are)."""
    retried: int = 0
    """Chunks that needed more than one request."""
    requests: int = 0
    """Requests sent to the servers (a document-level request covers several chunks)."""
    extra_requests: int = 0
    failed: int = 0
    tokens: int = 0
    """Completion tokens generated."""
    malformed: int = 0
    """Answers that could not be parsed into a chunk's valid tags (parse failures; each re-asked or failed)."""
    truncated: int = 0
    """Answers cut at the token cap, once per chunk they carried (asked again with a larger cap; at the largest
    cap they count as malformed too)."""
    echo_only: int = 0
    """Answers that parsed but held only echoes of the prompt's examples (each re-asked or failed)."""
    echoed: int = 0
    """Tags in first answers that repeated the prompt's few-shot examples."""
    echo_reasked: int = 0
    """Chunks asked again because their answer repeated the examples."""
    echo_dropped: int = 0
    """Echoed tags left out of the output."""
    reasons: Dict[str, int] = field(default_factory=dict)
    """Failed chunks (and bad input lines) per reason."""
    seconds: float = 0.0

    def to_json(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "Stats":
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        return cls(**known)


def format_summary(stats: Stats, config: AnnotateConfig) -> str:
    """The closing summary printed by ``tools/annotate.py``."""
    s = stats
    rate = s.chunks / s.seconds if s.seconds else 0.0
    tok_rate = s.tokens / s.seconds if s.seconds else 0.0
    lines = [
        f"annotate: {s.documents} documents, {s.chunks} chunks in {s.seconds:.1f}s "
        f"({rate:.1f} chunks/s, {tok_rate:.1f} generated tok/s)",
        f"  annotated: {s.annotated}   cached: {s.cached}   already tagged: {s.pretagged}",
        f"  requests:  {s.requests}   retried: {s.retried} chunks ({s.extra_requests} extra requests)   "
        f"malformed answers: {s.malformed}   cut at the token cap: {s.truncated} (asked again with a larger cap)",
        f"  echoes of the prompt's examples: {s.echoed} tags ({s.echo_reasked} chunks re-asked, "
        f"{s.echo_dropped} tags dropped, {s.echo_only} answers of echoes only)",
        f"  failed:    {s.failed} chunks, {s.documents_failed} documents",
    ]
    for reason, n in sorted(s.reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {n:>8}  {reason}")
    lines.append(f"  output: {config.output}")
    if s.documents_failed:
        lines.append(f"  failed documents (feed back as --input to retry): {config.failed_path}")
    return "\n".join(lines)
