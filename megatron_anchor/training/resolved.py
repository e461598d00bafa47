"""What a validated configuration implies, worked out once per run and handed to everything that needs it.

:func:`resolve_run` validates the flags, builds the tokenizer, and derives the data blend, the packing boundary mode,
the tokenizer record and the padded vocabulary into one frozen :class:`ResolvedRun`. Set-up, the model provider,
the datasets provider, the forward step and the loop read these values from it instead of recomputing them from
the flags (the boundary mode used to be recomputed every step). Cost: one validation and one tokenizer load; the
object itself holds a few small lists.

The Megatron-style seams keep their shape: a provider receives the run as a ``run=`` keyword only when its
signature names a ``run`` parameter (:func:`bind_run`, the way Megatron-LM's ``get_model`` passes
``vp_stage``), so providers written for the plain signatures keep working.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_anchor.training.blend import Blend
from megatron_anchor.training.config import AnchorConfig


@dataclass(frozen=True)
class ResolvedRun:
    """The run's derived configuration (identical on every rank); built by :func:`resolve_run` only."""

    blend: Optional[Blend]
    """The datasets read, with each one's loss-mask policy and source (None with --mock-data)."""
    boundary_mode: str
    """How document boundaries reach attention: ``none``, ``mask`` (block-causal, local layers) or ``thd``
    (Transformer Engine's packed sequences); see :func:`~megatron_anchor.training.loss.boundary_mode`."""
    tokenizer: object
    """The run's tokenizer (its ``vocab_size`` counts the annotation special tokens)."""
    tokenizer_record: Optional[dict]
    """Written into every --save folder and compared with datasets and checkpoints (None for NullTokenizer)."""
    vocab_size: int
    """The tokenizer's vocabulary size."""
    padded_vocab_size: int
    """Rows of the embedding and output layer (--padded-vocab-size, or the vocabulary padded for TP)."""

    @property
    def thd(self) -> bool:
        """Whether micro-batches are flattened into one packed THD sequence."""
        return self.boundary_mode == "thd"

    @property
    def replay_blend(self) -> Optional[Blend]:
        """The blend when it mixes replayed pretraining data in (each sample then carries its dataset's policy),
        else None."""
        return self.blend if self.blend is not None and "replay" in self.blend.sources else None


def resolve_run(cfg: AnchorConfig, world_size: int, has_cuda: bool, has_te: bool) -> ResolvedRun:
    """Validate ``cfg`` for ``world_size`` processes (filling in derived defaults in place), build the tokenizer and
    derive everything else once. Raises :class:`~megatron_anchor.training.config_io.ConfigError` for a run that
    cannot start."""
    from megatron_anchor.training.arguments import validate
    from megatron_anchor.training.data import build_tokenizer, run_tokenizer_record
    from megatron_anchor.training.loss import boundary_mode
    from megatron_anchor.training.model import vocab_rows

    blend = validate(cfg, world_size, has_cuda, has_te)
    tokenizer = build_tokenizer(cfg)
    return ResolvedRun(blend=blend,
                       boundary_mode=boundary_mode(cfg.data.reset_attention_mask, cfg.model.transformer_impl),
                       tokenizer=tokenizer, tokenizer_record=run_tokenizer_record(cfg, tokenizer),
                       vocab_size=tokenizer.vocab_size, padded_vocab_size=vocab_rows(cfg, tokenizer.vocab_size))


def bind_run(fn: Callable, run: Optional[ResolvedRun]) -> Callable:
    """``fn`` with ``run=run`` bound when there is a run and ``fn``'s signature names a ``run`` parameter, else ``fn``
    itself (a ``**kwargs`` catch-all does not count: it may hand its keywords to something that takes no ``run``)."""
    if run is None:
        return fn
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return fn
    return functools.partial(fn, run=run) if "run" in params else fn
