"""The training loop's callbacks: what happens around each step, in a fixed order, beside the step itself.

The loop (:func:`megatron_anchor.training.loop.run`) runs a step, reads its one all-reduce
(:class:`~megatron_anchor.training.step.StepReduction`), counts the step, and hands a :class:`StepInfo` to every
callback. Callbacks never start a collective of their own to decide anything, and none waits on the device except
where noted (the logging steps' peak-memory all-reduce, evaluation and checkpoints, as before there were callbacks).

Hooks (no-op defaults; subclass :class:`Callback` and override what you need):

- ``pre_train(tr, result)``: once, before the first step of a :func:`~megatron_anchor.training.loop.run` call;
- ``post_step(tr, result, step)``: after every step, once it is counted (``tr.state.iteration`` is the step's);
- ``post_checkpoint_saved(tr, result, iteration, path)``: after a checkpoint is complete on every rank;
- ``pre_exit(tr, result, step, reason)``: once, when the step's reduction (a signal, the time budget) or
  --exit-interval stops the run early; the reason is identical on every rank;
- ``post_train(tr, result)``: once, when --train-iters is reached (not on an early exit, not on a pause).

Order (fixed): the legacy ``on_step`` function (:class:`StepFunction`), :class:`TrainLogger`, :class:`Evaluator`,
:class:`Checkpointer`, the caller's callbacks, :class:`ExitRecorder`. So per step: the train log line, an
evaluation, a checkpoint, then the caller's callbacks (which see the logging keys on logging steps, and the
checkpoint of this step through ``post_checkpoint_saved`` first); on an early exit the checkpoint is saved before
the caller's ``pre_exit`` and the exit record is written last; at the end the final evaluation precedes the final
checkpoint. Cost: a few Python calls per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from megatron_anchor.training import checkpointing
from megatron_anchor.training.flops import step_flops
from megatron_anchor.training.monitor import format_train_line, peak_memory_bytes
from megatron_anchor.training.step import REDUCED_KEYS, RunResult, StepReduction, Trainer, evaluate, params_synced


@dataclass
class StepInfo:
    """One counted step, as the callbacks see it."""

    iteration: int
    metrics: Dict[str, Optional[float]]
    """The step's metrics (the dict ``result.train`` holds; :class:`TrainLogger` adds throughput keys on logging
    steps)."""
    reduction: StepReduction
    """The step's one all-reduce: losses, attention work, and the agreed exit and NaN flags."""
    seconds: float
    """Host wall time of the step (forward, backward, optimizer, reduction)."""


class Callback:
    """Base of the loop's callbacks: every hook is a no-op (see the module docstring for when each runs)."""

    def pre_train(self, tr: Trainer, result: RunResult) -> None:
        """Before the first step of this ``run`` call."""

    def post_step(self, tr: Trainer, result: RunResult, step: StepInfo) -> None:
        """After every counted step."""

    def post_checkpoint_saved(self, tr: Trainer, result: RunResult, iteration: int, path: str) -> None:
        """After the checkpoint of ``iteration`` is complete under ``path`` (every rank)."""

    def pre_exit(self, tr: Trainer, result: RunResult, step: StepInfo, reason: str) -> None:
        """The run stops early after ``step`` for ``reason`` (once; identical on every rank)."""

    def post_train(self, tr: Trainer, result: RunResult) -> None:
        """--train-iters reached (after the last step's hooks)."""


class CallbackList:
    """Callbacks called in list order, hook by hook."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: List[Callback] = list(callbacks)

    def fire(self, hook: str, *args) -> None:
        """Call ``hook`` of every callback, in order."""
        for cb in self.callbacks:
            getattr(cb, hook)(*args)


class StepFunction(Callback):
    """An ``on_step(iteration, metrics)`` function as a callback (the loop's original seam; runs first, before the
    train log line is added to the metrics, so it marks the step's end as it always did)."""

    def __init__(self, fn: Callable[[int, Dict], None]):
        self.fn = fn

    def post_step(self, tr, result, step):
        self.fn(step.iteration, step.metrics)


def log_valid(tr: Trainer, iteration: int, metrics: Dict[str, Optional[float]]) -> None:
    """Print and record (TensorBoard / W&B) one evaluation's losses."""
    parts = [f"validation at iteration {iteration}"]
    for key in REDUCED_KEYS:
        if metrics.get(key) is not None:
            parts.append(f"{key}: {metrics[key]:.6E}")
    if metrics.get("ppl") is not None:
        parts.append(f"lm loss PPL: {metrics['ppl']:.4f}")
    tr.monitor.print(" | ".join(parts))
    tr.monitor.scalars({k: metrics.get(k) for k in (*REDUCED_KEYS, "ppl")}, iteration, prefix="valid/")


def peak_memory_over_ranks(device) -> tuple:
    """``(bytes, rank)`` of the largest per-rank peak memory (one world-sized all-reduce; logging steps only)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    peaks = torch.zeros(world, dtype=torch.float64, device=device)
    peaks[rank] = float(peak_memory_bytes())
    if world > 1:
        dist.all_reduce(peaks)
    values = peaks.tolist()
    top = max(range(world), key=lambda r: values[r])
    return values[top], top


def throughput(tr: Trainer, step_seconds: float, attention_squares: float) -> Dict[str, Optional[float]]:
    """tokens/s, TFLOP/s per GPU and MFU of steps that took ``step_seconds`` each on average, with the window's
    mean attention work per step (``sum L^2``; 0: unpacked sequences of ``--seq-length``)."""
    cfg = tr.cfg
    t, seq = cfg.training, cfg.model.seq_length
    tokens = t.global_batch_size * seq
    squares = attention_squares or t.global_batch_size * seq * seq
    flops = step_flops(tr.shape, tokens, squares)
    tflops = flops / step_seconds / dist.get_world_size() / 1e12
    return {"tokens/s": tokens / step_seconds, "TFLOP/s/GPU": tflops,
            "MFU": tflops / tr.peak_tflops if tr.peak_tflops else None}


TRAIN_SCALARS = (*REDUCED_KEYS, "lr", "grad norm", "loss scale", "tokens/s", "TFLOP/s/GPU", "MFU", "peak memory GiB",
                 "ms/step")
"""What the train log line's step records as ``train/`` scalars."""


class TrainLogger(Callback):
    """Every --log-interval steps and at the last: step time, throughput and peak memory over the window since the
    last log line, the line itself and the ``train/`` scalars. The peak-memory all-reduce runs on these steps only."""

    def __init__(self):
        self.window_time, self.window_steps, self.window_squares, self.skipped = 0.0, 0, 0.0, 0

    def post_step(self, tr, result, step):
        t, metrics, it = tr.cfg.training, step.metrics, step.iteration
        self.window_time += step.seconds
        self.window_steps += 1
        self.window_squares += step.reduction.attention_squares
        self.skipped += int(metrics["skipped"])
        if it % tr.cfg.logging.log_interval and it != t.train_iters:
            return
        step_s = self.window_time / self.window_steps
        metrics["ms/step"] = 1000.0 * step_s
        metrics.update(throughput(tr, step_s, self.window_squares / self.window_steps))
        peak, peak_rank = peak_memory_over_ranks(tr.device)
        metrics["peak memory GiB"], metrics["peak memory rank"] = peak / 2 ** 30, peak_rank
        metrics["skipped iterations"] = self.skipped
        tr.monitor.print(format_train_line(it, t.train_iters, metrics, REDUCED_KEYS))
        tr.monitor.scalars({k: metrics.get(k) for k in TRAIN_SCALARS}, it, prefix="train/")
        self.window_time, self.window_steps, self.window_squares, self.skipped = 0.0, 0, 0.0, 0


class Evaluator(Callback):
    """Validation every --eval-interval steps (not at the last: the final evaluation follows it) and at the end."""

    def _evaluate(self, tr, result, iteration):
        valid = evaluate(tr)
        if valid is not None:
            valid["iteration"] = iteration
            result.valid.append(valid)
            log_valid(tr, iteration, valid)

    def post_step(self, tr, result, step):
        lg, it = tr.cfg.logging, step.iteration
        if lg.eval_interval and it % lg.eval_interval == 0 and it != tr.cfg.training.train_iters:
            self._evaluate(tr, result, it)

    def post_train(self, tr, result):
        self._evaluate(tr, result, tr.state.iteration)


class Checkpointer(Callback):
    """Checkpoints every --save-interval steps, before an early exit (unless this step just saved) and at the end
    (unless the last step just saved); each complete one is announced to ``callbacks`` through
    ``post_checkpoint_saved``."""

    def __init__(self, callbacks: CallbackList):
        self.callbacks = callbacks
        self.saved_at: Optional[int] = None

    def save(self, tr: Trainer, result: RunResult) -> str:
        """Save the current state under --save (parameters gathered first with the overlapped gather)."""
        ck = tr.cfg.checkpoint
        with params_synced(tr):
            path = checkpointing.save_checkpoint(ck.save, tr.state, tr.model, tr.optimizer, tr.scheduler,
                                                 ck.ckpt_fully_parallel_save, run_config=tr.cfg,
                                                 tokenizer_record=tr.run.tokenizer_record,
                                                 metadata=checkpointing.optimizer_metadata(tr.cfg))
        tr.monitor.print(f"saved checkpoint at iteration {tr.state.iteration} to {path}")
        self.saved_at = tr.state.iteration
        self.callbacks.fire("post_checkpoint_saved", tr, result, tr.state.iteration, path)
        return path

    def post_step(self, tr, result, step):
        ck = tr.cfg.checkpoint
        if ck.save and ck.save_interval and step.iteration % ck.save_interval == 0:
            self.save(tr, result)

    def pre_exit(self, tr, result, step, reason):
        if tr.cfg.checkpoint.save and self.saved_at != step.iteration:
            self.save(tr, result)

    def post_train(self, tr, result):
        ck = tr.cfg.checkpoint
        if ck.save and (not ck.save_interval or tr.state.iteration % ck.save_interval):
            self.save(tr, result)


class ExitRecorder(Callback):
    """On an early exit, after the checkpoint: the exit record a launcher reads (with --save) and the log line."""

    def pre_exit(self, tr, result, step, reason):
        ck = tr.cfg.checkpoint
        if ck.save:
            checkpointing.write_exit_record(ck.save, step.iteration, reason)
        tr.monitor.print(f"exiting at iteration {step.iteration}: {reason}"
                         + ("" if ck.save else " (no --save: nothing was saved)"))


def loop_callbacks(on_step: Optional[Callable[[int, Dict], None]] = None,
                   callbacks: Iterable[Callback] = ()) -> CallbackList:
    """The loop's callbacks in their fixed order (module docstring), with ``on_step`` and the caller's ``callbacks``
    in their places."""
    out = CallbackList()
    checkpointer = Checkpointer(out)
    out.callbacks = ([StepFunction(on_step)] if on_step is not None else []) + [
        TrainLogger(), Evaluator(), checkpointer, *callbacks, ExitRecorder()]
    return out
