"""The GPU acceptance script's plumbing, on CPU: ``benchmarks/gpu_acceptance.sh --smoke`` runs its training and
benchmark phases on a tiny model and writes the report the GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.distributed import REPO_ROOT


@pytest.mark.slow
def test_smoke_run_writes_the_report(tmp_path):
    out = str(tmp_path / "report.json")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "benchmarks", "gpu_acceptance.sh"), "--smoke", out],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(out, encoding="utf-8") as fh:
        report = json.load(fh)
    train, bench = report["train"], report["bench"]
    assert train["returncode"] == 0 and train["iterations_measured"] >= 1
    assert train["tokens_per_s"] > 0 and train["tflops_per_gpu"] > 0 and train["peak_memory_gib"] > 0
    assert train["mfu"] is None  # no peak on CPU: never a made-up MFU
    assert "--reset-attention-mask" in train["command"] and "sft-anchored" in train["command"]
    assert bench["returncode"] == 0 and bench["ratio"] > 0
    assert set(report["met"]) == {"mfu", "loop_ratio"} and report["met"]["mfu"] is False
    assert report["environment"]["megatron.core"] and report["layers"] == "local"


def test_gpu_test_files_are_found():
    sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
    import gpu_acceptance

    files = gpu_acceptance.gpu_test_files()
    assert "tests/test_fast_path_gpu.py" in files and "tests/test_packing.py" in files
    assert "tests/test_gpu_acceptance.py" not in files
