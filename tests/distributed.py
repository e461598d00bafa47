"""Run a function on N real processes joined by a gloo process group (CPU), or launch torchrun.

    results = run_distributed(fn, world_size=2, args=(a, b))   # fn(rank, world_size, a, b) on each rank

``fn`` must be importable (module level): workers are started with the ``spawn`` method so that each gets a
clean interpreter, as under torchrun. Return values come back ordered by rank; an exception on any rank is
re-raised here with that rank's traceback. ``allow_killed=True`` tolerates ranks that kill themselves (a
crash-and-resume test) and returns None for them.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch.multiprocessing as mp

from tests.paths import REPO as REPO_ROOT  # the name the distributed tests import from here


def free_port() -> int:
    """A TCP port that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence[Any], out_dir: str,
            threads: int, backend: str = "gloo") -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    # Oversubscribed cores make every process slower than one thread each.
    torch.set_num_threads(threads)
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        payload = ("ok", value)
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        payload = ("error", traceback.format_exc())
    with open(path, "wb") as fh:
        pickle.dump(payload, fh)
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown after a failure must not hide it
        pass


def run_distributed(fn: Callable, world_size: int = 2, args: Sequence[Any] = (), timeout: float = 600,
                    allow_killed: bool = False, threads: Optional[int] = None, backend: str = "gloo") -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes joined by ``backend`` (gloo; ``nccl`` for
    GPU tests, one device per rank); return per-rank results."""
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // world_size)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), out_dir, threads, backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
        results = []
        for r, p in enumerate(procs):
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if not os.path.exists(path):
                if allow_killed:
                    results.append(None)
                    continue
                raise RuntimeError(f"rank {r} exited with code {p.exitcode} without a result")
            with open(path, "rb") as fh:
                status, value = pickle.load(fh)
            if status == "error":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results


def run_torchrun(script_args: Sequence[str], nproc: int, timeout: float = 600,
                 env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N <script_args>`` from the repository root; output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *script_args]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def gradients(trainer, batch) -> List[Any]:
    """One forward-backward of ``batch`` through a trainer from ``megatron_anchor.training.loop.setup``: the
    main-grad of every parameter of its first model chunk (gradient buffers zeroed first)."""
    from megatron_anchor.training.step import forward_backward

    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    forward_backward(trainer, iter([batch]), forward_only=False)
    return [p.main_grad.clone() for p in trainer.model[0].parameters()]
