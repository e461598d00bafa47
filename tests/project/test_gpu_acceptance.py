"""The GPU acceptance run's plumbing, on CPU.

- ``benchmarks/gpu_acceptance.sh --smoke`` runs every phase but the GPU tests on a tiny model and writes the report
  the GPU run writes; a phase stopped at its time limit is reported as such, and the phases after it say why they
  did not run.
- Phases leave no process behind: not on time-out (torchrun's workers, which sit in sessions of their own,
  included), not when their command returns while its children still run.
- The GPU run's exact training and benchmark configurations (both layer implementations) pass the trainer's
  preflight as a GPU machine runs it (``for_gpu``), so a flag that cannot run there fails here, not there; the
  benchmark's stock arm is validated exactly as the trainer validates its own.
- The wheelhouse plan installs only what is missing and says in one line what it cannot provide.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from tests.distributed import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
import gpu_acceptance  # noqa: E402

from megatron_anchor import phases, wheelhouse  # noqa: E402


def _env():
    return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")


def _report(out_dir):
    with open(os.path.join(out_dir, gpu_acceptance.REPORT), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.integration
@pytest.mark.slow
def test_smoke_run_writes_the_report(tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu_acceptance.sh"), "--smoke", "--out", out],
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = _report(out)
    assert report["status"] == "complete" and report["ok"] is True and report["smoke"] is True
    phase = report["phases"]
    assert [phase[n]["status"] for n in ("install", "probe", "train", "bench")] == ["ok"] * 4
    assert phase["install"]["plan"]["problems"] == [] and phase["install"]["installed"] == []
    assert phase["tests"]["status"] == "not_run" and "CUDA" in report["not_run"]["tests"]
    for name in ("probe", "train", "bench"):  # each ran under its own limit, inside the budget, with its log here
        assert 0 < phase[name]["wall_s"] <= phase[name]["timeout_s"], phase[name]
        assert os.path.exists(os.path.join(out, phase[name]["log"]))
    assert report["wall_s"] <= report["budget_s"]
    train, bench = phase["train"], phase["bench"]
    assert train["iterations_measured"] >= 1 and train["warmup_excluded"] is True
    assert train["tokens_per_s"] > 0 and train["tflops_per_gpu"] > 0 and train["peak_memory_gib"] > 0
    assert train["mfu"] is None  # no peak on CPU: never a made-up MFU
    for flag in ("--bf16", "--use-distributed-optimizer", "--overlap-param-gather", "--reset-attention-mask",
                 "sft-anchored", "--exit-duration-in-mins"):
        assert flag in train["command"], flag
    assert bench["ratio"] > 0 and "--bf16" in bench["command"]
    assert report["figures"]["loop_ratio"] == bench["ratio"] and report["figures"]["tokens_per_s"] > 0
    assert report["met"] == {"mfu": None, "loop_ratio": None}  # smoke figures are not held to GPU targets
    env = report["environment"]
    assert env["torch"] and env["megatron.core"] and env["cuda"] is False and env["te_error"]
    assert report["layers"]["impl"] == "local" and report["layers"]["why"]


def test_a_phase_stopped_at_its_limit_is_reported_and_the_rest_say_why(tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "gpu_acceptance.py"), "--smoke",
                           "--out", out, "--limit", "probe=2"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    report = _report(out)
    probe = report["phases"]["probe"]
    assert probe["status"] == "timed_out" and probe["reason"] == "stopped at its time limit of 2 s"
    assert probe["wall_s"] < 20 and os.path.exists(os.path.join(out, "probe.log"))
    for name in ("train", "bench"):
        assert report["not_run"][name].startswith("the environment probe did not finish (timed_out"), report
    assert report["ok"] is False and report["status"].startswith("incomplete: probe timed_out")
    assert not _marked("probe")


def test_a_stopped_run_reports_it_and_takes_its_phase_down(tmp_path):
    """SIGTERM to the run itself (a caller's own time limit) while a phase runs."""
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "gpu_acceptance.py"), "--smoke",
                             "--out", out], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(out, "probe.log")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    proc.terminate()
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + 15, output
    report = _report(out)
    assert report["status"] == "stopped: Stopped: received SIGTERM" and report["ok"] is False, report["status"]
    assert report["phases"]["install"]["status"] == "ok" and "probe" not in report["phases"]
    assert not _marked("probe")


def test_transformer_engine_install_keeps_the_machines_torch(tmp_path, monkeypatch):
    """``TE_INSTALL=1``: pip gets the machine's torch as a constraint, so it fails rather than replace it."""
    seen = {}

    def fake_phase(self, name, cmd, later, env=None, timeout=None):
        seen["cmd"] = cmd
        with open(cmd[cmd.index("-c") + 1], encoding="utf-8") as fh:
            seen["keep"] = fh.read().split()
        return phases.PhaseResult(name=name, status="ok")

    monkeypatch.setattr(gpu_acceptance.Run, "phase", fake_phase)
    run = gpu_acceptance.Run(argparse.Namespace(out=str(tmp_path), budget=60.0, limit={}, smoke=False,
                                                wheelhouse=None))
    try:
        gpu_acceptance.do_te_install(run, ["probe"])
    finally:
        import shutil

        shutil.rmtree(run.work, ignore_errors=True)
    import torch

    assert f"torch=={torch.__version__}" in seen["keep"] and seen["cmd"][-1] == "transformer_engine[pytorch]"
    assert run.report["phases"]["te_install"]["status"] == "ok"


def test_budget_shortens_later_phases():
    now = [0.0]
    budget = phases.Budget(100, clock=lambda: now[0])
    assert budget.grant(60, reserve_s=30) == 60
    now[0] = 50.0  # a slow early phase
    assert budget.grant(60, reserve_s=30) == 20  # cut, so that the later phases keep their 30 s
    now[0] = 95.0
    assert budget.grant(60, reserve_s=30) == 0 and budget.left() == 5


# --- no process left behind ------------------------------------------------------------------------------------------

def _marked(name):
    """Live processes of any run of phase ``name`` (their environment carries the phase marker)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(phases.MARKER, "").startswith(f"{name}-") and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


TREE = r"""
import os, subprocess, sys, time
depth, pids = int(sys.argv[1]), sys.argv[2]
with open(os.path.join(pids, f"{depth}-{os.getpid()}"), "w"):
    pass
if depth:  # the child starts a session of its own, as torchrun's workers do
    subprocess.Popen([sys.executable, __file__, str(depth - 1), pids], start_new_session=True)
if depth == 2 and len(sys.argv) > 3:
    time.sleep(1.0)
    sys.exit(0)  # the phase's command returns while its children run on
time.sleep(600)
"""


def _alive(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _started(pids_dir):
    """depth -> pid of the processes of TREE (2: the phase's command)."""
    return {int(name.split("-")[0]): int(name.split("-")[1]) for name in os.listdir(pids_dir)}


@pytest.mark.parametrize("returns", [False, True])
def test_phase_leaves_no_process_behind(tmp_path, returns):
    """A command whose children and grandchildren sit in sessions of their own: stopped at its limit, or
    returning while they run on."""
    script, pids = tmp_path / "tree.py", tmp_path / "pids"
    script.write_text(TREE)
    pids.mkdir()
    cmd = [sys.executable, str(script), "2", str(pids)] + (["return"] if returns else [])
    result = phases.run_phase("tree", cmd, str(tmp_path / "tree.log"), timeout_s=20 if returns else 4, grace_s=1)
    started = _started(str(pids))
    assert sorted(started) == [0, 1, 2], started
    assert result.status == ("ok" if returns else "timed_out"), result
    assert not [p for p in started.values() if _alive(p)], started
    assert sorted(result.stopped_pids) == sorted([started[0], started[1]])  # the command itself is reaped


WORKER = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a trainer finishing its step before it exits
with open(os.path.join(sys.argv[1], str(os.getpid())), "w"):
    pass
time.sleep(600)
"""


@pytest.mark.integration
@pytest.mark.slow
def test_timed_out_torchrun_phase_leaves_no_worker_behind(tmp_path):
    """torchrun starts each worker in a session of its own (torch's SubprocessHandler), and workers that take their
    time to stop (here: they ignore SIGTERM) outlive a killed torchrun: stopping the phase's process group alone
    would leave them running (on a GPU machine, holding the GPU)."""
    script, pids = tmp_path / "worker.py", tmp_path / "pids"
    script.write_text(WORKER)
    pids.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(pids)]
    result = phases.run_phase("torchrun", cmd, str(tmp_path / "torchrun.log"), timeout_s=30, grace_s=2)
    workers = [int(p) for p in os.listdir(pids)]
    assert len(workers) == 2, (workers, (tmp_path / "torchrun.log").read_text()[-2000:])
    assert result.status == "timed_out"
    assert not [p for p in workers if _alive(p)], workers
    assert not _marked("torchrun")


# --- the GPU run's configurations, validated as a GPU machine would ---------------------------------------------------

def _recipe_model_args():
    cmd = 'MODEL_SIZE=1b; source examples/gpu/model_sizes.sh; echo "${MODEL_ARGS[*]} $MICRO_BATCH_SIZE"'
    words = subprocess.run(["bash", "-c", cmd], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    *model, mbs = words.split()
    return " ".join(model), int(mbs)


def _acceptance_args():
    model, mbs = _recipe_model_args()
    return argparse.Namespace(
        model_args=model, micro_batch_size=mbs, seq_length=4096, global_batch_size=8, steps=30, bench_steps=10,
        bench_seq_length=4096, smoke=False)


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_gpu_training_phase_passes_the_trainers_preflight_for_a_gpu(impl, tmp_path):
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import preflight
    from megatron_anchor.training.model import build_transformer_config

    args = _acceptance_args()
    prefix = gpu_acceptance.write_packed_sft_data(str(tmp_path / "sft"), 20_000)
    argv, why = gpu_acceptance.train_args(args.model_args, impl, prefix, str(tmp_path / "cache"), args)
    cfg = parse_args(argv)
    preflight(cfg, for_gpu=True)
    assert cfg.model.transformer_impl == impl and cfg.model.num_layers == 22 and cfg.model.seq_length == 4096
    assert cfg.training.bf16 and cfg.parallel.use_distributed_optimizer and cfg.parallel.overlap_param_gather
    assert cfg.data.reset_attention_mask and cfg.training.loss_mask_policy == "sft-anchored"
    build_transformer_config(cfg)  # megatron-core's own checks of the layout (recomputation, precision)
    if impl == "transformer_engine":
        assert cfg.training.micro_batch_size == args.micro_batch_size == 4 and "recipe" in why
    else:  # what fits 80 GB without Transformer Engine, and the report says why
        assert cfg.training.micro_batch_size == 1 and cfg.training.global_batch_size == 8
        assert cfg.performance.recompute_granularity == "selective"
        assert cfg.performance.recompute_modules == ["core_attn"] and "does not fit 80 GB" in why


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_bench_arms_are_validated_alike_for_a_gpu(impl, tiny_dataset, tmp_path):
    """The stock arm's config goes through the trainer's own preflight, as the ours arm's does: with Transformer
    Engine flags it is valid on a GPU machine with Transformer Engine (it used to be validated as if Transformer
    Engine were absent, and the bench phase exited with a ConfigError there)."""
    import bench_trainer  # imported here: it silences warnings for the whole process

    from megatron_anchor.training.arguments import ConfigError, parse_args, validate
    from megatron_anchor.training.loop import preflight

    argv = gpu_acceptance.bench_args(_acceptance_args(), impl, str(tmp_path / "bench.json"))
    args = bench_trainer.build_parser().parse_args(argv)
    common = bench_trainer.common_flags(args, tiny_dataset["prefix"], tiny_dataset["tokenizer_model"])
    stock, tokenizer = bench_trainer.stock_config(common, for_gpu=True)
    ours = parse_args(common + ["--loss-mask-policy", args.policy])
    preflight(ours, for_gpu=True)
    assert stock.model.transformer_impl == ours.model.transformer_impl == impl and tokenizer is not None
    assert stock.data.no_role_channel and stock.training.bf16 and stock.parallel.use_distributed_optimizer
    if impl == "transformer_engine":  # the old check: the stock arm validated without Transformer Engine
        with pytest.raises(ConfigError, match="transformer_engine needs Transformer Engine"):
            validate(parse_args(common + ["--no-role-channel"]), 1, True, False)


# --- reading the phases' output --------------------------------------------------------------------------------------

def test_train_log_pattern_reads_the_trainers_log_line():
    from megatron_anchor.training.monitor import format_train_line

    metrics = {"lm loss": 2.5, "lr": 1e-4, "grad norm": 1.0, "tokens/s": 12345.6, "TFLOP/s/GPU": 401.0,
               "MFU": 0.405, "peak memory GiB": 61.25, "peak memory rank": 0, "ms/step": 812.3}
    lines = "\n".join(format_train_line(i, 30, metrics) for i in range(1, 8))
    lines += "\nexiting at iteration 7: --exit-duration-in-mins 1.0 reached\n"
    figures = gpu_acceptance.parse_train_log(lines, warmup=5)
    assert figures["iterations_measured"] == 2 and figures["warmup_excluded"]
    assert figures["tokens_per_s"] == 12345.6 and figures["tflops_per_gpu"] == 401.0
    assert abs(figures["mfu"] - 0.405) < 1e-9 and figures["peak_memory_gib"] == 61.25
    assert figures["ms_per_step"] == 812.3 and figures["stopped_early"].startswith("at iteration 7")


def test_test_log_outcomes_and_the_test_running_when_stopped():
    log = "\n".join([
        "tests/training/test_fast_path_gpu.py::test_a PASSED                                    [ 20%]",
        "tests/training/test_fast_path_gpu.py::test_b[x] FAILED                                 [ 40%]",
        "tests/training/test_fast_path_gpu.py::test_c SKIPPED (needs Transformer Engine)       [ 60%]",
        "tests/training/test_packing.py::test_d ",
    ])
    parsed = gpu_acceptance.parse_test_log(log + "\nSKIPPED [1] tests/training/test_fast_path_gpu.py:210: needs TE\n")
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["failed"] == ["tests/training/test_fast_path_gpu.py::test_b[x]"]
    assert parsed["running_when_stopped"] == "tests/training/test_packing.py::test_d"
    assert parsed["skipped"] == ["tests/training/test_fast_path_gpu.py: needs TE"]


def test_gpu_test_files_are_found():
    files = gpu_acceptance.gpu_test_files()
    assert "tests/training/test_fast_path_gpu.py" in files and "tests/training/test_packing.py" in files
    assert "tests/project/test_gpu_acceptance.py" not in files


# --- the wheelhouse --------------------------------------------------------------------------------------------------

def _make_wheel(folder, name, version, requires=(), tag="py3-none-any"):
    """A real, installable wheel holding one module ``<name>_mod`` (``<name>_mod.VERSION``)."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}_mod.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\n" + f"Name: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    path = os.path.join(folder, f"{name}-{version}-{tag}.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for inner, text in files.items():
            zf.writestr(inner, text)
    return path


def test_plan_installs_only_what_is_missing_and_what_it_needs(tmp_path):
    house = str(tmp_path)
    _make_wheel(house, "alpha", "1.0")
    _make_wheel(house, "alpha", "1.2", ["gamma<1", 'delta; extra == "x"', 'eps; python_version < "3"'])
    _make_wheel(house, "gamma", "0.5", ["torch>=2"])
    _make_wheel(house, "beta", "1.1")
    _make_wheel(house, "newer", "1.0", tag="cp99-cp99-manylinux_2_99_x86_64")
    plan = wheelhouse.plan_install(["alpha>=1", "beta", "torch>=2"], house,
                                   installed={"torch": "2.11.0+cu130", "beta": "1.0"})
    assert [os.path.basename(w.path) for w in plan.wheels] == ["alpha-1.2-py3-none-any.whl",
                                                               "gamma-0.5-py3-none-any.whl"]
    assert plan.satisfied == {"beta": "1.0", "torch": "2.11.0+cu130"} and not plan.problems
    shadow = wheelhouse.plan_install(["beta>=1.1"], house, installed={"beta": "1.0"})
    assert shadow.shadowed == ["beta 1.0 -> 1.1"] and not shadow.problems

    bad = wheelhouse.plan_install(["zeta", "torch>=9", "newer"], house, installed={"torch": "2.11.0"})
    assert len(bad.problems) == 3 and not bad.wheels
    assert bad.problems[0].startswith("zeta (needed by setup.py) is not installed, and the wheelhouse")
    assert "torch>=9 (needed by setup.py) is installed as 2.11.0, which does not satisfy it; torch is never " \
           "installed here" in bad.problems[1]
    assert "newer" in bad.problems[2] and "fits this Python" in bad.problems[2]
    none = wheelhouse.plan_install(["zeta"], None, installed={})
    assert none.problems == ["zeta (needed by setup.py) is not installed, and there is no wheelhouse to install it "
                             "from (make one with benchmarks/gpu_wheelhouse.sh)"]


def test_install_puts_the_wheels_into_their_own_folder(tmp_path):
    house, target = tmp_path / "house", tmp_path / "site"
    house.mkdir()
    _make_wheel(str(house), "alpha", "1.2", ["gamma"])
    _make_wheel(str(house), "gamma", "0.5")
    plan = wheelhouse.plan_install(["alpha"], str(house), installed={})
    proc = wheelhouse.install(plan, str(target))
    assert proc.returncode == 0, proc.stderr
    check = subprocess.run([sys.executable, "-c", "import alpha_mod, gamma_mod; print(alpha_mod.VERSION, "
                            "gamma_mod.VERSION)"], env=dict(os.environ, PYTHONPATH=str(target)),
                           capture_output=True, text=True)
    assert check.stdout.split() == ["1.2", "0.5"], check.stderr


FAKE_PIP = r"""#!{python}
# Stands in for `python -m pip download --no-deps ... -d DEST REQ...`: copies the best match from FAKE_INDEX.
import os, shutil, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
args = sys.argv[4:]
dest = args[args.index("-d") + 1]
reqs = [a for i, a in enumerate(args) if not a.startswith("-") and not args[i - 1].startswith("-")]
index = os.environ["FAKE_INDEX"]
with open(os.path.join(dest, "..", "calls.txt"), "a") as fh:
    fh.write(" ".join(reqs) + "\n")
for text in reqs:
    req = Requirement(text)
    found = [(parse_wheel_filename(f)[1], f) for f in os.listdir(index)
             if canonicalize_name(parse_wheel_filename(f)[0]) == canonicalize_name(req.name)
             and req.specifier.contains(str(parse_wheel_filename(f)[1]), prereleases=True)]
    if not found:
        sys.exit(f"ERROR: No matching distribution found for {{text}}")
    shutil.copy(os.path.join(index, max(found)[1]), dest)
"""


def test_download_walks_what_the_wheels_need(tmp_path, monkeypatch):
    index, dest = tmp_path / "index", tmp_path / "house" / "whl"
    index.mkdir()
    _make_wheel(str(index), "alpha", "1.0", ["gamma>=0.5", "beta", "torch>=2", 'win; sys_platform == "win32"'])
    _make_wheel(str(index), "gamma", "0.5", ["nvidia-cublas", "delta"])
    _make_wheel(str(index), "delta", "3.0")
    _make_wheel(str(index), "beta", "1.0")
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PIP.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_INDEX", str(index))
    files = wheelhouse.download(["alpha"], str(dest), have={"beta": None}, python=str(fake))
    assert sorted(os.path.basename(f).split("-")[0] for f in files) == ["alpha", "delta", "gamma"]
    calls = (tmp_path / "house" / "calls.txt").read_text().split("\n")
    assert calls[:3] == ["alpha", "gamma>=0.5", "delta"]  # one pip call per level of the tree
    with pytest.raises(RuntimeError, match="pip found no wheel of missing"):
        wheelhouse.download(["missing"], str(dest), python=str(fake))


def test_wheelhouse_requirements_come_from_setup_py():
    required = wheelhouse.install_requires()
    assert any(r.startswith("megatron-core") for r in required) and "msgspec>=0.18" in required
    wanted = wheelhouse.download_requirements("3.12")
    assert f"megatron-core=={wheelhouse.MEGATRON_CORE_PY312}" in wanted
    assert not any(r.startswith("torch") for r in wanted) and "orjson" in wanted
    assert all(r.startswith("megatron-core>=") for r in wheelhouse.download_requirements("3.11")
               if r.startswith("megatron-core"))


def test_have_file_reads_freeze_output_and_names(tmp_path):
    path = tmp_path / "have.txt"
    path.write_text("# the image\ntorch==2.11.0+cu130\nPyYAML\n\n")
    assert wheelhouse.read_have(str(path)) == {"torch": "2.11.0+cu130", "pyyaml": None}
    path.write_text("torch==2.11\nnot a name!\n")
    with pytest.raises(ValueError, match=r"have.txt:2: expected NAME or NAME==VERSION"):
        wheelhouse.read_have(str(path))
