"""The one-shot GPU acceptance run (``benchmarks/gpu_acceptance.sh`` passes the 1B recipe's architecture).

Phases, one after another under one wall-clock budget (default 525 s: the whole run in 9 minutes on one H100),
each in a process session of its own, stopped with everything it started when its time is up
(:mod:`megatron_anchor.phases`); a slow phase shortens the later ones instead of overrunning:

0. ``install``: what this Python lacks of ``setup.py``'s runtime requirements, from a wheelhouse (``WHEELHOUSE``,
   else the repository's ``.whl/``) into a separate folder put first on ``PYTHONPATH``; the machine's torch is never
   replaced. ``TE_INSTALL=1`` also tries Transformer Engine from the package index (``te_install``; a source build).
1. ``probe``: the environment (GPU, torch, megatron-core, Transformer Engine, apex) and which layers the run uses.
2. ``tests``: every ``gpu``-marked test (``pytest -m gpu``).
3. ``train``: the 1B architecture in bf16 with the distributed optimizer (overlapped gradient reduce and parameter
   gather) on packed SFT-shaped batches with the role channel (``--loss-mask-policy sft-anchored``): tokens/s,
   TFLOP/s, MFU and peak memory from the trainer's own log lines after ``--warmup`` steps. The trainer gets the
   phase's time limit as ``--exit-duration-in-mins``, so it stops on its own, keeping its figures.
4. ``bench``: ``benchmarks/bench_trainer.py`` on the same architecture: the trainer's loop against the stock
   megatron-core loop.

The JSON report (``--out DIR``/gpu_acceptance.json) is rewritten atomically after every phase, so it exists, saying
where the run stopped and why, even when a phase fails or the run itself is killed; each phase's log lies beside it.
``--smoke`` runs the same phases on CPU with a tiny model (no GPU tests), to check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from megatron_anchor.outputs import write_json
from megatron_anchor.phases import Budget, PhaseResult, not_run, run_phase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = "gpu_acceptance.json"
TARGET_MFU = 0.45
"""Megatron-LM's published table gives 41% for a 1.7B GPT on H100 and 47-49% at 7-16B."""
TARGET_RATIO = 1.01
VOCAB = 32000
PHASES = {
    # name: (planned seconds, the least worth starting it with)
    "install": (60, 10),
    "te_install": (240, 60),
    "probe": (60, 15),
    "tests": (190, 60),
    "train": (150, 75),
    "bench": (130, 50),
}
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| tokens/s: (\S+) \| TFLOP/s/GPU: (\S+) \|(?: MFU: (\S+)% \|)? "
                  r"peak memory: (\S+) GiB \(rank \d+\) \| ms/step: (\S+)")
"""One log line of the trainer (``megatron_anchor.training.monitor.format_train_line``; a test holds them equal)."""
TEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.M)
SKIP_LINE = re.compile(r"^SKIPPED \[\d+\] (\S+?)(?::\d+)?: (.*)$", re.M)
SMOKE_MODEL = "--num-layers 2 --hidden-size 64 --ffn-hidden-size 256 --num-attention-heads 4 --swiglu " \
              "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear"
PRECISION = ["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
LOCAL_FIT = ["--recompute-granularity", "selective", "--recompute-modules", "core_attn"]
"""Without Transformer Engine, megatron-core's local attention materialises every [s, s] score matrix: at
sequence 4096 that is 0.5 GiB per layer and micro-batch sample in bf16 (twice that for the fp32 softmax), kept for
the backward pass in all 22 layers. Recomputing core attention keeps one layer's at a time."""


# --- phase 3: the configuration that fits ------------------------------------------------------------------------

def train_layout(impl: str, recipe_micro_batch: int, smoke: bool = False) -> Tuple[List[str], int, str]:
    """``(flags, micro-batch size, why)`` of the training phase on ``impl`` layers (besides the architecture, data,
    bf16 and the distributed optimizer, which every layout shares)."""
    if smoke:  # the layout of a GPU without Transformer Engine, on a tiny model
        return ["--transformer-impl", "local", *LOCAL_FIT], 1, "CPU smoke run: tiny model, local layers"
    if impl == "transformer_engine":
        return ["--transformer-impl", "transformer_engine"], recipe_micro_batch, (
            f"the 1b recipe's layout: Transformer Engine layers, micro-batch {recipe_micro_batch}, THD-packed "
            "documents (fused attention)")
    return ["--transformer-impl", "local", *LOCAL_FIT], 1, (
        "no Transformer Engine: megatron-core's local attention materialises the [s, s] scores (0.5 GiB per layer "
        f"and sample at sequence 4096, kept in all layers), so the recipe's micro-batch {recipe_micro_batch} does "
        "not fit 80 GB; micro-batch 1 with selective recomputation of core attention (one layer's scores live at a "
        "time) and a block-causal mask for the packed documents, same global batch")


def train_args(model_args: str, impl: str, data_prefix: str, cache: str, args) -> Tuple[List[str], str]:
    """The trainer's flags for the training phase, and why that layout."""
    layout, mbs, why = train_layout(impl, args.micro_batch_size, args.smoke)
    argv = [*shlex.split(model_args), *PRECISION, *layout,
            "--hidden-dropout", "0", "--attention-dropout", "0",
            "--seq-length", str(args.seq_length), "--micro-batch-size", str(mbs),
            "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.steps),
            "--lr", "3e-4", "--min-lr", "3e-5", "--lr-warmup-iters", "2", "--clip-grad", "1.0",
            "--data-path", data_prefix, "--split", "100,0,0", "--eval-iters", "0",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB), "--reset-attention-mask",
            "--loss-mask-policy", "sft-anchored", "--log-interval", "1", "--data-cache-path", cache]
    return argv, why


def write_packed_sft_data(prefix: str, tokens: int, seed: int = 0) -> str:
    """Synthetic SFT-shaped documents (prompt, annotation key/value, response, EOD) as a token + role dataset of
    about ``tokens`` tokens, vocabulary :data:`VOCAB` (NullTokenizer: EOD is the last id). Returns the prefix.
    Time and memory O(tokens)."""
    import numpy as np

    from megatron_anchor.data.indexed import write_token_role_documents
    from megatron_anchor.roles import Role

    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < tokens:
        n_prompt, n_ann, n_resp = int(rng.integers(50, 400)), int(rng.integers(10, 60)), int(rng.integers(100, 1800))
        n = n_prompt + n_ann + n_resp + 1
        ids = rng.integers(0, VOCAB - 1, n).astype(np.uint16)
        ids[-1] = VOCAB - 1
        roles = np.empty(n, dtype=np.uint8)
        roles[:n_prompt] = int(Role.PROMPT)
        roles[n_prompt:n_prompt + n_ann] = int(Role.ANNOTATION_KEY)
        roles[n_prompt + n_ann // 2:n_prompt + n_ann] = int(Role.ANNOTATION_VALUE)
        roles[n_prompt + n_ann:-1] = int(Role.RESPONSE)
        roles[-1] = int(Role.EOD)
        docs.append((ids, roles))
        total += n
    write_token_role_documents(prefix, docs, np.uint16)
    return prefix


# --- reading the phases' logs --------------------------------------------------------------------------------------

def parse_train_log(text: str, warmup: int) -> Dict:
    """Medians of the trainer's log lines after ``warmup`` iterations (all of them when the run stopped before)."""
    rows = [m.groups() for m in LINE.finditer(text)]
    steady = [r for r in rows if int(r[0]) > warmup]
    out: Dict = {"iterations_logged": len(rows), "warmup_excluded": bool(steady)}
    steady = steady or rows
    if not steady:
        return out

    def med(i):
        values = [float(r[i]) for r in steady if r[i] is not None]
        return statistics.median(values) if values else None

    mfu = med(3)
    out.update(iterations_measured=len(steady), tokens_per_s=med(1), tflops_per_gpu=med(2),
               mfu=mfu / 100 if mfu is not None else None, peak_memory_gib=max(float(r[4]) for r in steady),
               ms_per_step=med(5))
    fused = re.search(r"fused kernels on: (.*)", text)
    out["fused_kernels"] = fused.group(1).strip() if fused else None
    stop = re.search(r"exiting at iteration (\d+): (.*)", text)
    if stop:
        out["stopped_early"] = f"at iteration {stop.group(1)}: {stop.group(2).strip()}"
    return out


def parse_test_log(text: str) -> Dict:
    """Per-test outcomes of a ``pytest -v -rs`` log, counts, skip reasons, and the test that was running when the
    log ends without a summary (a phase stopped at its time limit)."""
    outcomes = {}
    for nodeid, outcome in TEST_LINE.findall(text):
        outcomes[nodeid] = outcome.lower()
    counts: Dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    out = {"counts": counts, "failed": sorted(k for k, v in outcomes.items() if v in ("failed", "error")),
           "skipped": {f"{path}: {reason}" for path, reason in SKIP_LINE.findall(text)}}
    out["skipped"] = sorted(out["skipped"])
    started = re.findall(r"^(tests/\S+::\S+) *$", text, re.M)
    unfinished = [n for n in started if n not in outcomes]
    if unfinished:
        out["running_when_stopped"] = unfinished[-1]
    return out


# --- the run --------------------------------------------------------------------------------------------------------

class Run:
    """The report and the budget of one acceptance run; every phase result goes through :meth:`record`."""

    def __init__(self, args):
        self.args = args
        self.out_dir = args.out
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(self.out_dir, REPORT)
        self.budget = Budget(args.budget)
        self.planned = {name: (args.limit.get(name, planned), min(least, args.limit.get(name, least)))
                        for name, (planned, least) in PHASES.items()}
        self.work = tempfile.mkdtemp(prefix="gpu_acceptance_")
        self.site = os.path.join(self.work, "site")
        self.report: Dict = {
            "status": "running", "smoke": args.smoke, "budget_s": args.budget,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {"host": platform.node(), "python": sys.version.split()[0], "executable": sys.executable},
            "targets": {"mfu": TARGET_MFU, "loop_ratio": TARGET_RATIO},
            "phases": {}, "not_run": {}, "note": "figures are measured by this run; none is a target or a guess",
        }
        self.write()

    def env(self) -> Dict[str, str]:
        """Environment of every phase: the installed wheels, then the repository, first on the path."""
        paths = [p for p in (self.site if os.path.isdir(self.site) else None, REPO, os.environ.get("PYTHONPATH"))
                 if p]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
        if self.args.smoke:
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def write(self) -> None:
        self.report["wall_s"] = round(self.budget.elapsed(), 1)
        write_json(self.path, self.report, fsync=True, indent=2)

    def grant(self, name: str, later: List[str]) -> float:
        """The time limit of phase ``name``: its plan, cut so that each of ``later`` keeps its minimum."""
        planned, least = self.planned[name]
        granted = self.budget.grant(planned, reserve_s=sum(self.planned[n][1] for n in later))
        return granted if granted >= least else 0.0

    def phase(self, name: str, cmd: List[str], later: List[str], env: Optional[Dict[str, str]] = None,
              timeout: Optional[float] = None) -> PhaseResult:
        """Run phase ``name`` under its grant (``timeout``: one granted just before), or record why not."""
        timeout = self.grant(name, later) if timeout is None else timeout
        log = os.path.join(self.out_dir, f"{name}.log")
        if timeout <= 0:
            result = not_run(name, f"only {self.budget.left():.0f} s of the {self.args.budget:.0f} s budget left, "
                                   f"less than this phase needs ({self.planned[name][1]} s) beside the later "
                                   "phases")
        else:
            print(f"[{self.budget.elapsed():5.0f} s] {name}: up to {timeout:.0f} s (log: {log})", flush=True)
            result = run_phase(name, cmd, log, timeout, env=env or self.env(), cwd=REPO)
        return result

    def record(self, result: PhaseResult, **extra) -> Dict:
        entry = result.to_dict()
        if entry.get("log"):
            entry["log"] = os.path.basename(entry["log"])
        entry.update(extra)
        self.report["phases"][result.name] = entry
        if result.status == "not_run":
            self.report["not_run"][result.name] = result.reason
        print(f"[{self.budget.elapsed():5.0f} s] {result.name}: {result.status}"
              + (f" ({result.reason})" if result.reason else ""), flush=True)
        self.write()
        return entry

    def skip(self, name: str, reason: str) -> None:
        self.record(not_run(name, reason))


def _read(path: Optional[str]) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def _last_json(text: str) -> Optional[Dict]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def do_install(run: Run, later: List[str]) -> bool:
    """Phase 0: install from the wheelhouse what this Python lacks. False when a requirement cannot be met."""
    from megatron_anchor import wheelhouse

    house = run.args.wheelhouse
    plan = wheelhouse.plan_install(wheelhouse.install_requires(), house)
    details = {"wheelhouse": house, "plan": plan.to_dict()}
    if plan.problems:
        run.record(PhaseResult(name="install", status="failed", reason=plan.problems[0]), **details)
        return False
    if not plan.wheels:
        run.record(PhaseResult(name="install", status="ok", reason=None), **details, installed=[])
        return True
    args = ["--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--upgrade",
            "--target", run.site, *[w.path for w in plan.wheels]]
    result = run.phase("install", [sys.executable, "-m", "pip", "install", *args], later)
    run.record(result, **details, installed=[f"{w.name}=={w.version}" for w in plan.wheels])
    return result.ok


def do_te_install(run: Run, later: List[str]) -> None:
    """Opt-in (``TE_INSTALL=1``): Transformer Engine for this torch from the package index (its PyTorch extension
    is a source build: nvcc, cuDNN headers, pybind11, ninja)."""
    from megatron_anchor import wheelhouse

    spec = os.environ.get("TE_SPEC", "transformer_engine[pytorch]")
    # pip may not replace the machine's torch or its CUDA stack to satisfy Transformer Engine: pinned as found.
    keep = os.path.join(run.work, "keep.txt")
    with open(keep, "w", encoding="utf-8") as fh:
        for name, version in wheelhouse.installed_versions().items():
            if wheelhouse.never_installed(name) and not name.startswith("transformer-engine"):
                fh.write(f"{name}=={version}\n")
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--disable-pip-version-check",
           "-c", keep, spec]
    if run.args.wheelhouse:
        cmd += ["--find-links", run.args.wheelhouse]
    run.record(run.phase("te_install", cmd, later), spec=spec)


PROBE = r"""
import json, sys
out = {}
try:
    import torch
    out.update(torch=torch.__version__, cuda_build=torch.version.cuda, cuda=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(p.total_memory / 2 ** 30, 1), devices=torch.cuda.device_count())
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
for module in ("megatron.core", "triton", "apex"):
    try:
        mod = __import__(module, fromlist=["__version__"])
        out[module] = getattr(mod, "__version__", "installed")
    except Exception as exc:
        out[module] = None
        out[module + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
try:
    from megatron_anchor.training.model import transformer_engine_import_error, transformer_engine_version
    out["transformer_engine"] = transformer_engine_version()
    out["te_error"] = transformer_engine_import_error()
except Exception as exc:
    out["te_error"] = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps(out))
"""


def do_probe(run: Run, later: List[str]) -> Optional[Dict]:
    """Phase 1: the environment, in a fresh interpreter with the installed wheels on its path."""
    result = run.phase("probe", [sys.executable, "-c", PROBE], later)
    info = _last_json(_read(result.log)) if result.ok else None
    if result.ok and info is None:
        result.status, result.reason = "failed", "the probe printed no JSON line"
    run.record(result)
    if info is not None:
        run.report["environment"] = info
    return info


def layers(info: Dict, smoke: bool) -> Dict[str, str]:
    """Which layers the run uses, and why."""
    if smoke:
        return {"impl": "local", "why": "CPU smoke run"}
    if info.get("te_error") is None:
        return {"impl": "transformer_engine",
                "why": f"transformer_engine.pytorch imports (Transformer Engine {info.get('transformer_engine')})"}
    hint = "" if os.environ.get("TE_INSTALL") == "1" else " (TE_INSTALL=1 tries a source build from the index)"
    return {"impl": "local", "why": f"{info['te_error']}{hint}: megatron-core's local layers"}


def gpu_test_files() -> List[str]:
    """Every test file under tests/ (its subfolders included) that carries the ``gpu`` marker, as paths relative
    to the repository; reads each test file once."""
    found = []
    for root, dirs, names in os.walk(os.path.join(REPO, "tests")):
        dirs.sort()
        for name in sorted(names):
            if name.startswith("test_") and name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as fh:
                    if "pytest.mark.gpu" in fh.read():
                        found.append(os.path.relpath(path, REPO))
    return sorted(found)


def do_tests(run: Run, later: List[str]) -> None:
    files = gpu_test_files()
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rs", "-p", "no:cacheprovider", *files]
    result = run.phase("tests", cmd, later)
    parsed = parse_test_log(_read(result.log)) if result.log else {}
    if result.status == "timed_out" and parsed.get("running_when_stopped"):
        result.reason += f", while {parsed['running_when_stopped']} ran"
    elif result.status == "failed" and parsed.get("failed"):
        result.reason = f"{len(parsed['failed'])} failed: {', '.join(parsed['failed'])}"
    run.record(result, files=files, **parsed)


def do_train(run: Run, impl: str, later: List[str]) -> Dict:
    args = run.args
    timeout = run.grant("train", later)
    if timeout <= 0:
        return run.record(run.phase("train", [], later), layers=impl)
    tokens = (args.steps + 2) * args.global_batch_size * (args.seq_length + 1) * 2
    prefix = write_packed_sft_data(os.path.join(run.work, "sft_packed"), tokens)
    argv, why = train_args(args.model_args, impl, prefix, os.path.join(run.work, "cache"), args)
    # The trainer stops itself (and logs its figures) a little before the phase would be stopped.
    argv += ["--exit-duration-in-mins", f"{max(timeout - 25.0, 0.25 * timeout) / 60:.3f}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "pretrain_anchor.py", *argv]
    env = dict(run.env(), CUDA_DEVICE_MAX_CONNECTIONS="1")
    result = run.phase("train", cmd, later, env=env, timeout=min(timeout, run.grant("train", later)))
    figures = parse_train_log(_read(result.log), args.warmup) if result.log else {}
    if result.ok and "tokens_per_s" not in figures:
        result.status, result.reason = "failed", "the trainer exited 0 but logged no iteration line"
    return run.record(result, layers=impl, layout=why, command="torchrun pretrain_anchor.py " + shlex.join(argv),
                      **figures)


def bench_args(args, impl: str, json_path: str) -> List[str]:
    """``bench_trainer.py``'s flags for the bench phase: the training phase's layers and precision."""
    layout, mbs, _ = train_layout(impl, args.micro_batch_size, args.smoke)
    extra = " ".join([args.model_args, "--bf16", "--use-distributed-optimizer", *layout])
    return ["--steps", str(args.bench_steps), "--block", "5", "--warmup", "2",
            "--seq-length", str(args.bench_seq_length), "--micro-batch-size", str(mbs),
            "--global-batch-size", str(args.global_batch_size), "--extra", extra, "--json", json_path]


def do_bench(run: Run, impl: str, later: List[str]) -> Dict:
    path = os.path.join(run.work, "bench.json")
    argv = bench_args(run.args, impl, path)
    result = run.phase("bench", [sys.executable, os.path.join("benchmarks", "bench_trainer.py"), *argv], later)
    figures = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        figures = {"ratio": data["ratio"], "median_ms": data["median_ms"], "data_path_ratio": data["data_path_ratio"]}
    elif result.ok:
        result.status, result.reason = "failed", "bench_trainer.py exited 0 but wrote no figures"
    return run.record(result, layers=impl, command="bench_trainer.py " + shlex.join(argv), **figures)


def summarise(run: Run) -> int:
    phases = run.report["phases"]
    train, bench = phases.get("train", {}), phases.get("bench", {})
    mfu, ratio = train.get("mfu"), bench.get("ratio")
    run.report["figures"] = {"tokens_per_s": train.get("tokens_per_s"), "tflops_per_gpu": train.get("tflops_per_gpu"),
                             "mfu": mfu, "peak_memory_gib": train.get("peak_memory_gib"), "loop_ratio": ratio}
    # A smoke run checks the plumbing on CPU: its figures are not held to the GPU targets.
    run.report["met"] = {"mfu": None if mfu is None or run.args.smoke else mfu >= TARGET_MFU,
                         "loop_ratio": None if ratio is None or run.args.smoke else ratio <= TARGET_RATIO}
    failed = {n: p.get("reason") for n, p in phases.items() if p.get("status") in ("failed", "timed_out")}
    must = ["install", "probe", "train", "bench"] + ([] if run.args.smoke or run.args.skip_tests else ["tests"])

    def status(name):
        return phases.get(name, {}).get("status", "not_run")

    missing = [n for n in must if status(n) != "ok"]
    run.report["ok"] = not missing
    run.report["status"] = "complete" if not missing else \
        "incomplete: " + ", ".join(f"{n} {status(n)}" for n in missing)
    run.report["failed"] = failed
    run.write()
    f = run.report["figures"]
    print(f"report: {run.path}\n  status {run.report['status']}\n  tokens/s {f['tokens_per_s']}, TFLOP/s "
          f"{f['tflops_per_gpu']}, MFU {mfu}, peak memory {f['peak_memory_gib']} GiB, loop ratio {ratio}", flush=True)
    return 0 if run.report["ok"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "runs", "gpu_acceptance"),
                    help="folder for the report and the phases' logs (default: $OUT when set, else "
                         "runs/gpu_acceptance in the repository)")
    ap.add_argument("--model-args", default=None, help="architecture flags (gpu_acceptance.sh passes the 1b entry "
                                                       "of examples/gpu/model_sizes.sh)")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="the recipe's micro-batch (with Transformer "
                                                                    "Engine; without it the run uses 1)")
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="training steps of the train phase")
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the train phase's medians")
    ap.add_argument("--bench-steps", type=int, default=10, help="timed steps per arm in the bench phase")
    ap.add_argument("--bench-seq-length", type=int, default=None,
                    help="sequence length of the bench phase (default: --seq-length, so that it reuses the training "
                         "phase's compiled kernels)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", 525)),
                    help="seconds for the whole run, installs included (default 525, or $BUDGET_S)")
    ap.add_argument("--wheelhouse", default=os.environ.get("WHEELHOUSE") or
                    (os.path.join(REPO, ".whl") if os.path.isdir(os.path.join(REPO, ".whl")) else None),
                    help="folder of wheels for what this Python lacks (default: $WHEELHOUSE, else .whl/ when present)")
    ap.add_argument("--skip-tests", action="store_true", help="leave out the gpu tests")
    ap.add_argument("--limit", action="append", default=[], metavar="PHASE=SECONDS",
                    help=f"another time limit for a phase (phases and their planned seconds: "
                         f"{', '.join(f'{k} {v[0]}' for k, v in PHASES.items())})")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny model, no GPU tests")
    args = ap.parse_args(argv)
    limits = {}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        try:
            if name not in PHASES:
                raise ValueError(name)
            limits[name] = float(seconds)
        except ValueError:
            ap.error(f"--limit {item}: expected PHASE=SECONDS with PHASE one of {', '.join(PHASES)}")
    args.limit = limits
    args.bench_seq_length = args.bench_seq_length or args.seq_length
    if args.smoke:
        args.model_args = SMOKE_MODEL
        args.seq_length, args.bench_seq_length, args.global_batch_size = 64, 64, 4
        args.steps, args.warmup, args.bench_steps = 3, 1, 2
    elif not args.model_args:
        ap.error("--model-args is required (benchmarks/gpu_acceptance.sh passes the 1b recipe's)")

    run = Run(args)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    try:
        return _phases(run)
    except BaseException as exc:  # noqa: BLE001 - the report must say why the run stopped, whatever stopped it
        run.report["status"] = f"stopped: {type(exc).__name__}: {exc}"[:500]
        run.report["ok"] = False
        run.write()
        if isinstance(exc, Stopped):
            print(f"report: {run.path}\n  status {run.report['status']}", flush=True)
            return 128 + exc.signum
        raise
    finally:
        shutil.rmtree(run.work, ignore_errors=True)  # data, caches and installed wheels: the logs keep the story


class Stopped(Exception):
    """This run received a signal that ends it (the phase in flight is stopped with all its processes)."""

    def __init__(self, signum: int):
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def _stop(signum, _frame):
    raise Stopped(signum)


def _phases(run: Run) -> int:
    args = run.args
    te_wanted = os.environ.get("TE_INSTALL") == "1" and not args.smoke
    order = ["install", *(["te_install"] if te_wanted else []), "probe",
             *([] if args.smoke or args.skip_tests else ["tests"]), "train", "bench"]

    def later(name):
        return order[order.index(name) + 1:]

    installed = do_install(run, later("install"))
    if os.path.isdir(run.site):
        # This process writes the training data with the project's own writer (numpy may be among the wheels).
        sys.path.insert(0, run.site)
    if not installed:
        reason = f"the install phase could not provide what the run needs: {run.report['phases']['install']['reason']}"
        for name in order[1:]:
            run.skip(name, reason)
        return summarise(run)
    if te_wanted:
        do_te_install(run, later("te_install"))
    info = do_probe(run, later("probe"))
    if info is None or info.get("megatron.core") is None or (not args.smoke and not info.get("cuda")):
        if info is None:
            probe = run.report["phases"]["probe"]
            reason = f"the environment probe did not finish ({probe['status']}: {probe['reason']})"
        elif info.get("megatron.core") is None:
            reason = f"megatron.core does not import: {info.get('megatron.core_error')}"
        else:
            reason = (f"torch {info.get('torch')} (CUDA build {info.get('cuda_build')}) sees no CUDA GPU: a CUDA "
                      "build of torch and a GPU are needed")
        for name in order[order.index("probe") + 1:]:
            run.skip(name, reason)
        summarise(run)
        return 2
    run.report["layers"] = layers(info, args.smoke)
    impl = run.report["layers"]["impl"]
    if "tests" in order:
        do_tests(run, later("tests"))
    elif not args.smoke:
        run.skip("tests", "--skip-tests")
    else:
        run.skip("tests", "--smoke: the gpu tests need a CUDA GPU")
    do_train(run, impl, later("train"))
    do_bench(run, impl, later("bench"))
    return summarise(run)


if __name__ == "__main__":
    raise SystemExit(main())
