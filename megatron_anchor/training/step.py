"""One training step and one evaluation on megatron-core's schedules, and what the loop holds between steps.

Per step the host waits on the device once: the losses, the attention work for the FLOPs count, and every rank's
exit and NaN observations travel in one all-reduce (:func:`reduce_step`) whose result is read in one copy
(megatron-core's optimizer reads the gradient norm itself). Time per step: the forward and backward passes of
``--global-batch-size`` sequences; memory: megatron-core's (activations of the micro-batches in flight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_anchor.training import checkpointing, guards
from megatron_anchor.training.config import AnchorConfig
from megatron_anchor.training.flops import ModelShape
from megatron_anchor.training.loss import REPORT_KEYS
from megatron_anchor.training.monitor import Monitor
from megatron_anchor.training.resolved import ResolvedRun

# Metrics reduced exactly over micro-batches and data-parallel ranks as [sum, count] pairs.
REDUCED_KEYS = REPORT_KEYS


@dataclass
class RunResult:
    """What a run did; identical on every rank (losses are reduced over all ranks)."""

    train: List[Dict[str, Optional[float]]] = field(default_factory=list)
    """Per-iteration metrics (iteration, the REDUCED_KEYS losses, lr, grad norm; on logging steps also tokens/s,
    TFLOP/s/GPU, MFU, peak memory)."""
    valid: List[Dict[str, Optional[float]]] = field(default_factory=list)
    """Per-evaluation metrics."""
    final_state: Optional[checkpointing.TrainState] = None
    exit_reason: Optional[str] = None
    """Why the run stopped before --train-iters (a signal, the time budget, --exit-interval), else None."""
    profile_trace: Optional[str] = None
    """The trace file ``--profile`` wrote on this rank, if any."""


@dataclass
class Trainer:
    """Everything the loop holds after setup (model chunks, optimizer, schedule, data, hooks)."""

    cfg: AnchorConfig
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    state: checkpointing.TrainState
    train_iter: object
    """What the schedule gets: one iterator (or None on a stage that uses no data), or one per model chunk."""
    make_valid_iter: Callable
    forward_step: Callable
    monitor: Monitor
    device: torch.device
    run: ResolvedRun
    """The run's derived configuration (blend, boundary mode, tokenizer and its record, padded vocabulary)."""
    source: Optional[object] = None
    """The training :class:`~megatron_anchor.training.batch.MicroBatchSource` (counts attention work)."""
    valid_enabled: bool = True
    shape: Optional[ModelShape] = None
    peak_tflops: Optional[float] = None
    """One device's peak for MFU (detected or --peak-tflops; None on CPU)."""
    param_sync_func: Optional[object] = None
    """megatron-core's aligned parameter gather, held back until the first step succeeded (overlapped gather)."""
    gather_pending: bool = False
    """With --overlap-param-gather: the forward hooks are off until the first step succeeded (Megatron-LM)."""
    step_returns_norm: bool = True
    """Whether ``optimizer.step()`` returns the real gradient norm: megatron-core's ChainedOptimizer always computes
    it; a bare optimizer only when it clips (--clip-grad > 0)."""


def num_microbatches(cfg: AnchorConfig) -> int:
    """Micro-batches per step on each data-parallel rank."""
    from megatron.core import parallel_state as ps

    t = cfg.training
    return t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())


def forward_backward(tr: Trainer, data_iterator, forward_only: bool):
    """megatron-core's schedule over one global batch; returns the last stage's per-micro-batch loss reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = tr.cfg
    seq, mbs = cfg.model.seq_length, cfg.training.micro_batch_size
    if tr.run.thd:
        # THD flattens a micro-batch into one packed sequence: pipeline stages exchange [b*s, 1, h] tensors
        # (megatron-core divides the length by the context-parallel size itself).
        seq, mbs = seq * mbs, 1
    if len(tr.model) > 1 and not isinstance(data_iterator, list):
        raise ValueError("with virtual pipeline stages the schedule needs one data iterator per model chunk "
                         "(megatron_anchor.training.batch.distribute builds them)")
    return get_forward_backward_func()(
        forward_step_func=tr.forward_step,
        data_iterator=data_iterator,
        model=tr.model if len(tr.model) > 1 else tr.model[0],
        num_microbatches=num_microbatches(cfg),
        seq_length=seq,
        micro_batch_size=mbs,
        decoder_seq_length=seq,
        forward_only=forward_only,
    )


@dataclass
class StepReduction:
    """One step's numbers after the single all-reduce: identical on every rank."""

    losses: Dict[str, Optional[float]]
    """Each REDUCED_KEYS entry's token mean (None without tokens) and its token count (``<key> tokens``)."""
    attention_squares: float
    """``sum L^2`` over the step's documents, all data-parallel ranks (0 when not counted)."""
    signal_received: bool
    duration_exceeded: bool
    bad_loss: bool
    """Some rank's own loss sum was NaN or Inf."""
    local_loss: Optional[torch.Tensor] = None
    """This rank's own loss sum (a device tensor; read only on the error path)."""

    def local_loss_bad(self) -> bool:
        """Whether this rank's own loss was NaN/Inf (a device-to-host copy: error path only)."""
        return self.local_loss is not None and not bool(torch.isfinite(self.local_loss))


def reduce_step(tr: Trainer, outputs: List[Dict[str, torch.Tensor]], signal_received: bool = False,
                 duration_exceeded: bool = False, attention_squares: int = 0) -> StepReduction:
    """Sum [sum, count] pairs over micro-batches and ranks, with the step's attention work and every rank's
    exit/NaN flags, in one all-reduce over all ranks and one device-to-host copy.

    Losses come from the last pipeline stage's tensor-parallel rank 0 of every data- and context-parallel rank
    (tensor-parallel ranks hold copies; context-parallel ranks hold parts of each sequence's loss)."""
    from megatron.core import parallel_state as ps

    n = len(REDUCED_KEYS)
    packed = torch.zeros(2 * n + 4, dtype=torch.float64, device=tr.device)
    local_loss = None
    if outputs:
        local_loss = torch.stack([out["lm loss"][0].to(device=tr.device, dtype=torch.float64) for out in outputs]).sum()
        if ps.get_tensor_model_parallel_rank() == 0:
            for out in outputs:
                for i, key in enumerate(REDUCED_KEYS):
                    if key in out:
                        packed[2 * i: 2 * i + 2] += out[key].to(device=tr.device, dtype=torch.float64)
        packed[2 * n + 3] = (~torch.isfinite(local_loss)).to(torch.float64)
    # fill_ passes each host number to the device as a kernel argument: no host-to-device copy, no wait.
    packed[2 * n].fill_(float(attention_squares))
    packed[2 * n + 1].fill_(float(signal_received))
    packed[2 * n + 2].fill_(float(duration_exceeded))
    if dist.get_world_size() > 1:
        dist.all_reduce(packed)
    values = packed.tolist()
    losses: Dict[str, Optional[float]] = {}
    for i, key in enumerate(REDUCED_KEYS):
        total, count = values[2 * i], values[2 * i + 1]
        losses[key] = total / count if count > 0 else None
        losses[key + " tokens"] = count
    return StepReduction(losses, values[2 * n], values[2 * n + 1] > 0, values[2 * n + 2] > 0, values[2 * n + 3] > 0,
                         local_loss)


def train_step(tr: Trainer, signal_received: bool = False, duration_exceeded: bool = False,
               exit_flags: Optional[Callable[[], Tuple[bool, bool]]] = None):
    """One optimizer step over a global batch: ``(metrics, reduction)``.

    ``metrics`` holds the reduced losses, lr, grad norm, whether the update was skipped (fp16 overflow) and the
    loss scale; ``reduction`` (:class:`StepReduction`) also the agreed exit and NaN flags. ``exit_flags``: this
    rank's ``(signal received, time budget spent)``, read after the optimizer step, right before the all-reduce
    (replaces ``signal_received`` and ``duration_exceeded``, which are read before the step)."""
    for chunk in tr.model:
        chunk.zero_grad_buffer()
    tr.optimizer.zero_grad()
    outputs = forward_backward(tr, tr.train_iter, forward_only=False)
    update_ok, grad_norm, _ = tr.optimizer.step()
    if exit_flags is not None:
        # Read once the step is done (Megatron-LM checks after train_step): a signal or the end of the time budget
        # during this step's forward and backward stops the run after this step, not after one more.
        signal_received, duration_exceeded = exit_flags()
    if update_ok and not tr.step_returns_norm:
        # Without clipping a bare megatron optimizer computes no norm (None, or 0.0 from the mixed-precision
        # ones); the gradients are still in place after the step.
        grad_norm = tr.optimizer.get_grad_norm() if tr.cfg.training.check_for_nan_in_loss_and_grad else None
    if update_ok:
        tr.scheduler.step(increment=1)
    squares = 0
    if tr.source is not None:
        squares, tr.source.attention_squares = tr.source.attention_squares, 0
    red = reduce_step(tr, outputs, signal_received, duration_exceeded, squares)
    metrics = dict(red.losses)
    metrics["grad norm"] = float(grad_norm) if grad_norm is not None else None
    metrics["lr"] = tr.optimizer.param_groups[0]["lr"]
    metrics["skipped"] = not update_ok
    if tr.cfg.training.fp16:
        metrics["loss scale"] = float(tr.optimizer.get_loss_scale())
    return metrics, red


class params_synced:
    """With the overlapped parameter gather, finish the pending gather and pause the forward hooks (evaluation,
    checkpoints), as Megatron-LM does; a no-op otherwise."""

    def __init__(self, tr: Trainer):
        self.tr = tr
        self.active = tr.cfg.parallel.overlap_param_gather

    def __enter__(self):
        # Before the first successful step the hooks are already off and the weights are the loaded (or initial)
        # ones, which no update has touched: nothing to gather (fp16 skips steps while the loss scale settles).
        self.active = self.active and not self.tr.gather_pending
        if self.active:
            prepare = getattr(self.tr.optimizer, "prepare_model_params_for_param_sync", None)
            if prepare is not None:
                prepare()
            for chunk in self.tr.model:
                chunk.disable_forward_pre_hook(param_sync=True)

    def __exit__(self, *exc):
        if self.active:
            for chunk in self.tr.model:
                chunk.enable_forward_pre_hook()


def check_finite(tr: Trainer, it: int, metrics: Dict, red: StepReduction) -> None:
    """Stop every rank alike when a loss or the gradient norm is NaN/Inf (``--check-for-nan-in-loss-and-grad``)."""
    from megatron.core import parallel_state as ps

    if red.bad_loss:
        bad = guards.ranks_where(red.local_loss_bad(), tr.device)
        raise guards.TrainingAborted(
            f"NaN or Inf in the loss at iteration {it} on rank(s) {bad} (first: rank {bad[0] if bad else '?'}, "
            f"data-parallel rank {ps.get_data_parallel_rank()} here); nothing from this step was saved: resume "
            "from the last checkpoint (e.g. with a lower --lr), or check that rank's data and hardware "
            "(--no-check-for-nan-in-loss-and-grad turns this check off)")
    norm = metrics.get("grad norm")
    if norm is not None and not math.isfinite(norm) and not tr.cfg.training.fp16:
        # (fp16 overflows are the loss scaler's job: it skips the step and lowers the scale.)
        bad = guards.ranks_where(not guards.local_grads_finite(tr.model), tr.device)
        raise guards.TrainingAborted(
            f"NaN or Inf in the gradients at iteration {it} (grad norm {norm}; non-finite gradients on rank(s) "
            f"{bad or 'none locally: the reduction overflowed'}); nothing from this step was saved: resume from "
            "the last checkpoint (e.g. with a lower --lr or --clip-grad), or turn the check off with "
            "--no-check-for-nan-in-loss-and-grad")


@torch.no_grad()
def evaluate(tr: Trainer) -> Optional[Dict[str, Optional[float]]]:
    """Validation losses over ``--eval-iters`` global batches (the same batches at every evaluation)."""
    iters = tr.cfg.logging.eval_iters
    if iters == 0 or not tr.valid_enabled:
        return None
    data_iter = tr.make_valid_iter()
    for chunk in tr.model:
        chunk.eval()
    outputs = []
    with params_synced(tr):
        for _ in range(iters):
            outputs.extend(forward_backward(tr, data_iter, forward_only=True))
    for chunk in tr.model:
        chunk.train()
    metrics = reduce_step(tr, outputs).losses
    loss = metrics["lm loss"]
    metrics["ppl"] = math.exp(min(loss, 20.0)) if loss is not None else None
    return metrics


