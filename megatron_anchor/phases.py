"""Time-boxed phases: run a command under a deadline, its output in a log file, and leave nothing running after it.

A phase is one command (pytest, torchrun, pip ...) started in a process session of its own. On time-out the whole
process tree goes, not only the command: ``torchrun`` starts each worker in a session of its own (torch's
``SubprocessHandler`` passes ``start_new_session=True``), so killing the phase's process group alone would leave the
workers holding the GPU. Every process of a phase therefore carries a marker in its environment (workers inherit
their launcher's environment), and after the phase, whether it ended or was stopped, every process that carries
the marker or descends from the phase is stopped: SIGTERM first (torchrun forwards it to its workers), SIGKILL
after a grace period.

:class:`Budget` shares one wall-clock budget among phases that run one after another: each phase is granted at
most what is left after what the later phases need at least, so a slow early phase shortens the later ones rather
than overrunning the whole.

    budget = Budget(540)
    result = run_phase("tests", ["python", "-m", "pytest", ...], "out/tests.log", budget.grant(200, reserve_s=150))

Cost: one scan of the process table per clean-up (O(processes), reading each one's environment), nothing while the
phase runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

MARKER = "MEGATRON_ANCHOR_PHASE"
"""Environment variable that tags every process of a phase (its value is unique per phase run)."""


@dataclass
class PhaseResult:
    """What one phase did."""

    name: str
    status: str
    """``ok`` (exit 0), ``failed`` (another exit status), ``timed_out`` (stopped at its time limit), or ``not_run``."""
    returncode: Optional[int] = None
    """The command's exit status (negative: killed by that signal); None when it did not run."""
    wall_s: float = 0.0
    timeout_s: Optional[float] = None
    log: Optional[str] = None
    """The log file (the command's stdout and stderr), relative to the report's folder when written there."""
    reason: Optional[str] = None
    """One line: why the phase failed, timed out or did not run (None when it succeeded)."""
    stopped_pids: List[int] = field(default_factory=list)
    """Processes of the phase stopped after it (on time-out, or left running when its command returned)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> Dict:
        return asdict(self)


def not_run(name: str, reason: str) -> PhaseResult:
    """The record of a phase that was not started, with its one-line reason."""
    return PhaseResult(name=name, status="not_run", reason=reason)


class Budget:
    """One wall-clock budget for phases run one after another (``clock``: seconds, monotonic)."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.total_s = float(total_s)
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.total_s - self.elapsed())

    def grant(self, planned_s: float, reserve_s: float = 0.0) -> float:
        """The time limit for the next phase: its planned time, cut to what is left once ``reserve_s`` (what the
        later phases need at least) is set aside; 0 when nothing is left for it."""
        return max(0.0, min(float(planned_s), self.left() - float(reserve_s)))


def _psutil():
    import psutil  # a runtime dependency of the project (setup.py); imported late so this module loads without it

    return psutil


def phase_processes(marker: str, also: Sequence[int] = ()) -> List[int]:
    """PIDs of every live process that carries ``marker`` in its environment, plus those of ``also`` still alive."""
    psutil = _psutil()
    me = os.getpid()
    found = set()
    for pid in also:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.add(pid)
        except psutil.Error:
            continue
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me or proc.pid in found:
            continue
        try:
            # A zombie has exited (it only waits for its parent to read its status): nothing to stop.
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.add(proc.pid)
        except psutil.Error:  # gone, or another user's process
            continue
    return sorted(found)


def descendants(pid: int) -> List[int]:
    """PIDs of every live descendant of ``pid`` (empty when it is gone)."""
    psutil = _psutil()
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def stop_processes(marker: str, also: Sequence[int] = (), grace_s: float = 5.0) -> List[int]:
    """Stop every process of a phase (see :func:`phase_processes`): SIGTERM, then SIGKILL after ``grace_s``.
    Repeats until none is left (a launcher may start a worker while it is being stopped). Returns their PIDs."""
    psutil = _psutil()
    stopped: List[int] = []
    for attempt in range(5):
        procs = []
        for pid in phase_processes(marker, also):
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                continue
        if not procs:
            break
        sig = signal.SIGTERM if attempt == 0 else signal.SIGKILL
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                continue
        _, alive = psutil.wait_procs(procs, timeout=grace_s if attempt == 0 else 2.0)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(alive, timeout=2.0)
        stopped.extend(p.pid for p in procs if p.pid not in stopped)
    return stopped


def run_phase(name: str, cmd: Sequence[str], log_path: str, timeout_s: float, env: Optional[Dict[str, str]] = None,
              cwd: Optional[str] = None, grace_s: float = 5.0) -> PhaseResult:
    """Run ``cmd`` in a session of its own for at most ``timeout_s`` seconds, stdout and stderr to ``log_path``,
    then stop every process it left behind. A ``timeout_s`` of 0 or less runs nothing (``not_run``)."""
    if timeout_s <= 0:
        return not_run(name, "no time left in the budget")
    marker = f"{name}-{uuid.uuid4().hex}"
    full_env = dict(os.environ if env is None else env)
    full_env[MARKER] = marker
    start = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=full_env, cwd=cwd, start_new_session=True)
        except OSError as exc:
            return PhaseResult(name=name, status="failed", timeout_s=timeout_s, log=log_path,
                               reason=f"could not start {cmd[0]}: {exc}")
        timed_out, tree = False, []
        try:
            proc.wait(timeout=timeout_s)
        except BaseException as exc:
            if not isinstance(exc, subprocess.TimeoutExpired):
                # This process itself is being stopped (a signal turned into an exception, Ctrl-C): the phase
                # goes with it, then the exception goes on.
                tree = descendants(proc.pid)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
                stop_processes(marker, tree, grace_s=1.0)
                raise
            timed_out = True
            tree = descendants(proc.pid)  # before the command dies and its children are re-parented
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.kill()
                proc.wait()
        stopped = stop_processes(marker, tree, grace_s)
        wall = time.monotonic() - start
        log.write(f"\n[{name}: {'stopped at its time limit after' if timed_out else 'exited after'} {wall:.1f} s, "
                  f"status {proc.returncode}; {len(stopped)} process(es) stopped after it]\n".encode())
    if timed_out:
        status, reason = "timed_out", f"stopped at its time limit of {timeout_s:.0f} s"
    elif proc.returncode == 0:
        status, reason = "ok", None
    else:
        status, reason = "failed", f"exit status {proc.returncode} (see {os.path.basename(log_path)})"
    return PhaseResult(name=name, status=status, returncode=proc.returncode, wall_s=round(wall, 1),
                       timeout_s=round(timeout_s, 1), log=log_path, reason=reason, stopped_pids=stopped)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:  # the group is already gone
        pass
