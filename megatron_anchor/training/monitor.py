"""Console log lines, TensorBoard and wandb. Only the logging rank (the last one) writes anything."""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional

from megatron_anchor.training.config import AnchorConfig


class Monitor:
    """Sends scalar metrics to the console and, when asked, to TensorBoard and wandb."""

    def __init__(self, cfg: AnchorConfig, is_logging_rank: bool, stream=None):
        self.enabled = is_logging_rank
        self.stream = stream or sys.stdout
        self.tb = None
        self.wandb_run = None
        lg = cfg.logging
        if not self.enabled:
            return
        if lg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=lg.tensorboard_dir)
        if lg.wandb_project:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("--wandb-project needs wandb: pip install 'megatron-anchor[logging]'") from exc
            save_dir = lg.wandb_save_dir or (os.path.join(cfg.checkpoint.save, "wandb")
                                             if cfg.checkpoint.save else "wandb")
            os.makedirs(save_dir, exist_ok=True)
            self.wandb_run = wandb.init(
                project=lg.wandb_project,
                name=lg.wandb_exp_name,
                dir=save_dir,
                config=_flat_config(cfg),
            )

    def print(self, line: str) -> None:
        """A console line from the logging rank."""
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def scalars(self, metrics: Dict[str, float], step: int, prefix: str = "") -> None:
        """Write metrics to TensorBoard / wandb (console lines are formatted by the loop)."""
        if not self.enabled:
            return
        named = {f"{prefix}{k}": v for k, v in metrics.items() if v is not None}
        if self.tb is not None:
            for k, v in named.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(named, step=step)

    def close(self) -> None:
        """Flush and close the writers."""
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _flat_config(cfg: AnchorConfig) -> Dict[str, object]:
    from dataclasses import asdict

    flat = {}
    for section, values in asdict(cfg).items():
        for k, v in values.items():
            flat[f"{section}.{k}"] = v
    return flat


def format_train_line(iteration: int, train_iters: int, metrics: Dict[str, Optional[float]],
                      loss_keys=None) -> str:
    """One console line: iteration, losses, lr, grad norm, throughput (tokens/s, TFLOP/s per GPU, MFU), peak
    memory and step time. ``loss_keys``: the losses to show (default: every reported one)."""
    parts = [f"iteration {iteration:8d}/{train_iters:8d}"]
    from megatron_anchor.training.loss import REPORT_KEYS

    for key in (REPORT_KEYS if loss_keys is None else loss_keys):
        if metrics.get(key) is not None:
            parts.append(f"{key}: {metrics[key]:.6E}")
    parts.append(f"lr: {metrics['lr']:.6E}")
    gn = metrics.get("grad norm")
    parts.append(f"grad norm: {gn:.4f}" if gn is not None else "grad norm: n/a")
    if metrics.get("loss scale") is not None:
        parts.append(f"loss scale: {metrics['loss scale']:.1f}")
    if metrics.get("skipped iterations"):
        parts.append(f"skipped iterations: {int(metrics['skipped iterations'])}")
    parts.append(f"tokens/s: {metrics['tokens/s']:.1f}")
    if metrics.get("TFLOP/s/GPU") is not None:
        parts.append(f"TFLOP/s/GPU: {metrics['TFLOP/s/GPU']:.3g}")
    if metrics.get("MFU") is not None:
        parts.append(f"MFU: {100 * metrics['MFU']:.3g}%")
    if metrics.get("peak memory GiB") is not None:
        parts.append(f"peak memory: {metrics['peak memory GiB']:.2f} GiB (rank {metrics['peak memory rank']})")
    parts.append(f"ms/step: {metrics['ms/step']:.1f}")
    return " | ".join(parts)


def peak_memory_bytes() -> int:
    """This process's peak memory: the CUDA caching allocator's peak on GPU, the peak resident set on CPU."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def profile_dir(cfg: AnchorConfig) -> str:
    """Where ``--profile`` writes its traces (see ``--profile-dir``)."""
    lg = cfg.logging
    if lg.profile_dir:
        return lg.profile_dir
    if lg.tensorboard_dir:
        return lg.tensorboard_dir
    return os.path.join(cfg.checkpoint.save, "profile") if cfg.checkpoint.save else "profile"


class StepProfiler:
    """``--profile``: a torch.profiler trace of iterations ``--profile-step-start`` to ``--profile-step-end``
    (as numbered in the log) on the ranks in ``--profile-ranks``, written as ``rank<R>.<time>.pt.trace.json``
    (Chrome trace format; TensorBoard's profiler plugin reads the folder). Elsewhere every call is a no-op."""

    def __init__(self, cfg: AnchorConfig, rank: int):
        lg = cfg.logging
        self.enabled = lg.profile and rank in lg.profile_ranks
        self.start, self.end = lg.profile_step_start, lg.profile_step_end
        self.rank = rank
        self.dir = profile_dir(cfg)
        self.prof = None
        self.written: Optional[str] = None

    def before_step(self, iteration: int) -> None:
        """Call before running ``iteration``."""
        if self.enabled and self.prof is None and iteration == self.start:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self.prof.start()

    def after_step(self, iteration: int) -> None:
        """Call after ``iteration`` finished (its losses reduced)."""
        if self.prof is not None and iteration >= self.end:
            self.close()

    def close(self) -> None:
        """Stop a running trace and write it (a run that ends inside the window still writes what it has)."""
        if self.prof is None:
            return
        import torch

        self.prof.stop()
        os.makedirs(self.dir, exist_ok=True)
        before = set(os.listdir(self.dir))
        torch.profiler.tensorboard_trace_handler(self.dir, worker_name=f"rank{self.rank}")(self.prof)
        new = sorted(set(os.listdir(self.dir)) - before)
        self.written = os.path.join(self.dir, new[-1]) if new else None
        self.prof = None
