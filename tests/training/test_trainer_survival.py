"""Runs that survive a cluster: exit signals, the time budget, --exit-interval and NaN/Inf checks.

One 2-process gloo session (DP=2) poisons one rank's weights or gradients and expects every rank to stop with the
iteration and that rank named; stops on --exit-interval and --exit-duration-in-mins with a checkpoint; and sends
SIGTERM to rank 0 alone mid-run, expecting both ranks to save at the same step, after which a resumed run's losses
equal an uninterrupted run's exactly. A torchrun test then signals the launcher itself, as Slurm does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed import REPO_ROOT, free_port, run_distributed, run_torchrun
from tests.training.test_trainer_parallel import ITERS, _argv, _train

pytestmark = pytest.mark.integration


def _setup(argv):
    import pretrain_anchor as pa
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import setup

    return setup(parse_args(argv), pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)


def _aborted(tr, on_step):
    from megatron_anchor.training.guards import TrainingAborted
    from megatron_anchor.training.loop import run

    try:
        res = run(tr, on_step=on_step)
    except TrainingAborted as exc:
        return str(exc)
    return [m["lm loss"] for m in res.train]


def _guards_session(rank, world, data, tmp):
    import math

    import torch

    from megatron_anchor.training.checkpointing import latest_iteration

    out = {}
    # NaN weights on rank 1 after iteration 2: its loss at iteration 3 is NaN, rank 0's is not.
    tr = _setup(_argv(data, tmp, dropout=False))

    def poison_weights(it, _m):
        if it == 2 and rank == 1:
            with torch.no_grad():
                next(tr.model[0].module.parameters()).fill_(float("nan"))

    out["nan_loss"] = _aborted(tr, poison_weights)
    # NaN gradients on rank 1 from iteration 3 on (the loss stays finite).
    tr = _setup(_argv(data, tmp, dropout=False))
    param = list(tr.model[0].module.parameters())[-1]

    def poison_grads(it, _m):
        if it == 2 and rank == 1:
            param.register_hook(lambda g: g * float("nan"))

    out["nan_grad"] = _aborted(tr, poison_grads)
    # With the check off, the same poison trains on (the losses go NaN).
    tr = _setup(_argv(data, tmp, "--no-check-for-nan-in-loss-and-grad", dropout=False))
    losses = _aborted(tr, poison_weights)
    out["unchecked_nan"] = isinstance(losses, list) and len(losses) == ITERS and math.isnan(losses[-1])

    for name, extra in (("interval", ["--exit-interval", "3"]), ("duration", ["--exit-duration-in-mins", "1e-9"])):
        ck = os.path.join(tmp, f"ck_{name}")
        tr = _setup(_argv(data, tmp, "--save", ck, *extra))
        from megatron_anchor.training.loop import run

        res = run(tr)
        out[name] = (res.exit_reason, len(res.train), latest_iteration(ck))

    # SIGTERM reaches rank 0 only, after iteration 3 was checked (on_step runs then), so during iteration 4: both
    # ranks finish iteration 4, save, and stop.
    ck = os.path.join(tmp, "ck_signal")

    def signal_rank0(it, _m):
        if it == 3 and rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    tr = _setup(_argv(data, tmp, "--save", ck, "--save-interval", "100"))
    from megatron_anchor.training.loop import run

    res = run(tr, on_step=signal_rank0)
    out["signalled"] = (res.exit_reason, len(res.train), latest_iteration(ck))
    out["resumed"] = _train(_argv(data, tmp, "--save", ck, "--load", ck))
    out["reference"] = _train(_argv(data, tmp))
    return out


@pytest.fixture(scope="module")
def guards(tiny_dataset, tmp_path_factory):
    return run_distributed(_guards_session, 2, args=(tiny_dataset, str(tmp_path_factory.mktemp("guards"))))


def test_nan_loss_stops_every_rank_naming_iteration_and_rank(guards):
    for rank_result in guards:
        msg = rank_result["nan_loss"]
        assert isinstance(msg, str), f"training went on: {msg}"
        assert "NaN or Inf in the loss at iteration 3 on rank(s) [1]" in msg, msg


def test_nan_gradients_stop_every_rank(guards):
    for rank_result in guards:
        msg = rank_result["nan_grad"]
        assert isinstance(msg, str) and "NaN or Inf in the gradients at iteration 3" in msg, msg
    assert guards[0]["unchecked_nan"], "--no-check-for-nan-in-loss-and-grad should let the run go on"


def test_exit_interval_and_duration_save_then_stop(guards):
    reason, steps, saved = guards[0]["interval"]
    assert "--exit-interval 3" in reason and steps == 3 and saved == 3
    reason, steps, saved = guards[0]["duration"]
    assert "--exit-duration-in-mins" in reason and steps == 1 and saved == 1


def test_signal_on_one_rank_saves_on_all_and_resume_is_exact(guards):
    for rank_result in guards:
        reason, steps, saved = rank_result["signalled"]
        assert "exit signal" in reason and steps == 4 and saved == 4
    assert guards[0]["resumed"]["loss"] == guards[0]["reference"]["loss"][4:]  # exact float equality
    assert guards[0]["resumed"]["valid"] == guards[0]["reference"]["valid"]


_LOSS = re.compile(r"iteration +(\d+)/ *\d+ \| lm loss: ([0-9.E+-]+)")


def _losses(text):
    return {int(i): x for i, x in _LOSS.findall(text)}


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_and_exits_then_resumes_exactly(tiny_dataset, tmp_path):
    """The launcher gets SIGTERM (a scheduler's preemption): torchrun forwards it, each worker finishes its step,
    saves and exits 0; the resumed run's logged losses equal an uninterrupted run's."""
    iters = 12
    base = _argv(tiny_dataset, str(tmp_path), iters=iters) + ["--log-interval", "1"]
    ck = str(tmp_path / "ck")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "pretrain_anchor.py", *base, "--save", ck]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 600
    try:
        for line in proc.stdout:
            lines.append(line)
            m = _LOSS.search(line)
            if m and int(m.group(1)) == 3:
                proc.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "no iteration 3 within 10 minutes"
        lines += proc.stdout.readlines()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    stopped = re.search(r"exiting at iteration (\d+): exit signal received", log)
    assert stopped, log[-4000:]
    k = int(stopped.group(1))
    assert 3 <= k < iters
    from megatron_anchor.training.checkpointing import latest_iteration

    assert latest_iteration(ck) == k
    resumed = run_torchrun(["pretrain_anchor.py", *base, "--save", ck, "--load", ck], nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    reference = run_torchrun(["pretrain_anchor.py", *base], nproc=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    got = _losses(resumed.stdout + resumed.stderr)
    want = _losses(reference.stdout + reference.stderr)
    assert sorted(got) == list(range(k + 1, iters + 1))
    assert got == {i: want[i] for i in got}


@pytest.mark.slow
def test_preemption_signal_to_every_process_of_a_recipe_shell_saves_the_step(tiny_dataset, tmp_path):
    """Slurm's ``--signal=USR1@T`` (no ``B:``) signals every process of the job step: the recipe's shell, torchrun,
    the workers and their DataLoader workers. Through examples/gpu/preemption.sh, as the GPU recipes launch: the
    shell ignores it, torchrun forwards it (PET_SIGNALS_TO_HANDLE) and waits, the workers finish the step, save and
    exit 0, and the launch's status is 0 although torchrun re-raises the signal. A shell that died of the signal, or
    a DataLoader worker that did, would end the job step without the save."""
    import shlex

    iters = 12
    ck = str(tmp_path / "ck")
    # DataLoader workers too, as the GPU recipes run them: they must leave the signal to the trainer.
    base = _argv(tiny_dataset, str(tmp_path), iters=iters) + ["--log-interval", "1", "--exit-signal", "SIGUSR1",
                                                              "--save", ck, "--num-workers", "2"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
              str(free_port()), "pretrain_anchor.py", *base]
    script = ("source examples/gpu/preemption.sh\nrun_training " + shlex.quote(ck) + " "
              + " ".join(shlex.quote(a) for a in launch) + "\n")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", EXIT_SIGNAL="SIGUSR1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300")
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    proc = subprocess.Popen(["bash", "-c", script], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.time() + 600
    try:
        for line in proc.stdout:
            lines.append(line)
            m = _LOSS.search(line)
            if m and int(m.group(1)) == 3:
                os.killpg(proc.pid, signal.SIGUSR1)  # the whole step, as slurmstepd does
                break
            assert time.time() < deadline, "no iteration 3 within 10 minutes"
        lines += proc.stdout.readlines()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines)
    assert proc.returncode == 0, (proc.returncode, log[-3000:])
    stopped = re.search(r"exiting at iteration (\d+): exit signal received", log)
    assert stopped, log[-4000:]
    from megatron_anchor.training.checkpointing import latest_iteration

    assert latest_iteration(ck) == int(stopped.group(1))
    assert "Traceback" not in log.split("exiting at iteration")[0]
    assert "does not forward SIGUSR1" not in log
    assert "after the trainer stopped cleanly" in log  # torchrun's own status was 1: the recipe turned it into 0
