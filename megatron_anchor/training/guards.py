"""What stops a run: preemption signals, a time budget, and NaN/Inf in the loss or the gradients.

Every rank must stop at the same step, or the ranks that go on hang in their next collective. So each rank
records what it saw (a signal arrived, its clock passed ``--exit-duration-in-mins``, its own loss is not finite)
and :func:`agree` combines those with one small all-reduce per step; the verdict is then identical everywhere.
A signal only sets a flag: the step in flight finishes, a checkpoint is saved, and the process exits 0, which is
what a preempted Slurm job needs (``--signal=USR1@120`` or SIGTERM before the kill). A non-finite value stops the
run with :class:`TrainingAborted` naming the iteration and the rank, and nothing from that step is saved.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """A run that cannot go on (NaN/Inf); raised identically on every rank."""


class ExitSignalHandler:
    """Records the first of ``signals`` that arrives; the training loop polls :attr:`received` once per step.

    Installed only in the main thread (Python delivers signals there); the previous handlers come back on
    :meth:`restore`.
    """

    def __init__(self, names: Iterable[str]):
        self.signals = sorted({signal.Signals[name] for name in names})
        self.received: Optional[signal.Signals] = None
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def install(self) -> "ExitSignalHandler":
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding application): nothing to install
                logger.warning("cannot handle %s outside the main thread; a signal will kill the run", sig.name)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


TORCHRUN_DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
"""What torchrun forwards to its workers when TORCHELASTIC_SIGNALS_TO_HANDLE is not set (torch's default); torch
releases before 2.9 know no other and die of any other signal, taking the workers with them."""
TORCHRUN_SHUTDOWN_DEFAULT_S = 30.0


def launcher_signal_problems(exit_signal: str, saving: bool, environ=None) -> List[str]:
    """Why a scheduler's exit signal would not end this torchrun job with a saved checkpoint (empty when it
    would, or when the process was not started by torchrun).

    Read from the worker's environment, which torchrun fills: ``TORCHELASTIC_RUN_ID`` marks a torchrun worker;
    a torchrun of torch >= 2.9 sets ``TORCHELASTIC_SIGNALS_TO_HANDLE`` to the signals it forwards (its
    ``--signals-to-handle``, or ``PET_SIGNALS_TO_HANDLE``), older ones do not; ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (seconds from forwarding to SIGKILL, default 30) reaches the workers
    when it was exported for the launcher."""
    import os

    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return []
    problems = []
    listed = env.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    if listed is None:
        if exit_signal not in TORCHRUN_DEFAULT_SIGNALS:
            problems.append(f"this torchrun (torch {torch.__version__}: before 2.9) forwards only "
                            f"{', '.join(TORCHRUN_DEFAULT_SIGNALS)} and dies of {exit_signal}, killing the workers "
                            f"before they save: have the scheduler send SIGTERM (--exit-signal SIGTERM), launch with "
                            f"a torch >= 2.9 torchrun, or start one process per GPU without torchrun")
    elif exit_signal not in {name.strip() for name in listed.split(",")}:
        problems.append(f"torchrun does not forward {exit_signal} (it handles {listed}): add it to torchrun's "
                        "--signals-to-handle (or export PET_SIGNALS_TO_HANDLE; an exported "
                        "TORCHELASTIC_SIGNALS_TO_HANDLE is overwritten by the launcher), or the launcher dies of it "
                        "before the workers save")
    if saving:
        try:
            timeout = float(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", TORCHRUN_SHUTDOWN_DEFAULT_S))
        except ValueError:
            timeout = TORCHRUN_SHUTDOWN_DEFAULT_S
        if timeout < 120:
            problems.append(f"torchrun SIGKILLs the workers {timeout:g} s after forwarding a signal, which may cut "
                            "the final checkpoint short: export TORCH_ELASTIC_SHUTDOWN_TIMEOUT (e.g. 600) for the "
                            "launcher")
    return problems


@dataclass
class Verdict:
    """What all ranks agreed on after a step."""

    signal_received: bool = False
    duration_exceeded: bool = False
    bad_loss_rank: Optional[int] = None
    """Lowest global rank whose local loss was NaN/Inf (None when every rank's loss was finite)."""


def agree(device: torch.device, signal_received: bool, duration_exceeded: bool, loss_finite) -> Verdict:
    """Combine this rank's observations with every other rank's (one all-reduce of three numbers).

    ``loss_finite`` is a bool or a 0-dim tensor (a tensor keeps the GPU path free of an extra host sync).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if not isinstance(loss_finite, torch.Tensor):
        loss_finite = torch.tensor(bool(loss_finite))
    # Bad-loss slot: world - rank for a bad rank, so that MAX picks the lowest such rank.
    flags = torch.stack([
        torch.tensor(float(signal_received), device=device),
        torch.tensor(float(duration_exceeded), device=device),
        (~loss_finite.to(device).bool()).float() * float(world - rank),
    ])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    sig, dur, bad = flags.tolist()
    return Verdict(signal_received=sig > 0, duration_exceeded=dur > 0,
                   bad_loss_rank=int(world - bad) if bad > 0 else None)


def ranks_where(flag: bool, device: torch.device) -> List[int]:
    """Global ranks on which ``flag`` is true (a world-sized all-reduce; only used on the error path)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    marks = torch.zeros(world, device=device)
    marks[rank] = float(flag)
    if world > 1:
        dist.all_reduce(marks)
    return [r for r, m in enumerate(marks.tolist()) if m > 0]


def local_grads_finite(model_chunks) -> bool:
    """Whether this rank's gradients (megatron DDP's ``main_grad`` buffers) hold only finite values."""
    for chunk in model_chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return False
    return True


class Clock:
    """Minutes since this process started (set-up spends a job's time limit too), for
    ``--exit-duration-in-mins``."""

    def __init__(self, limit_minutes: Optional[float]):
        import psutil

        self.start = psutil.Process().create_time()
        self.limit = limit_minutes

    def exceeded(self) -> bool:
        return self.limit is not None and (time.time() - self.start) / 60.0 >= self.limit
