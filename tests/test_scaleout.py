"""Sharded runs on a local Ray instance: same dataset as the single-process tool, retried after a worker dies."""

import os
import threading
import time

import psutil
import pytest

from tests.conftest import file_bytes
from tools import preprocess_data

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    from megatron_anchor.scaleout.ray_runner import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


def _args(inp, out, model):
    return ["--input", str(inp), "--output-prefix", str(out), "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", model, "--append-eod", "--docs-per-part", "25"]


def test_ray_preprocess_equals_single_process(local_ray, corpus_dir, sp_model, tmp_path):
    from megatron_anchor.scaleout.ray_runner import run_on_ray

    inp = corpus_dir / "raw.jsonl"
    assert preprocess_data.main(_args(inp, tmp_path / "single", sp_model) + ["--no-progress"]) == 0
    summary = run_on_ray("preprocess", _args(inp, tmp_path / "ray", sp_model), num_shards=4, show_progress=False)
    assert not summary.failed and summary.output == str(tmp_path / "ray_text_document")
    assert sum(r.stats["documents"] for r in summary.results) == 400
    assert list(file_bytes(summary.output).values()) == \
        list(file_bytes(str(tmp_path / "single_text_document")).values())


def _shard_processes():
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::run_shard"):
            out.append(p)
    return out


def test_killed_worker_is_retried_and_nothing_is_lost(local_ray, corpus_dir, sp_model, tmp_path):
    from megatron_anchor.scaleout.ray_runner import run_on_ray

    inp = tmp_path / "big.jsonl"
    inp.write_bytes(open(corpus_dir / "raw.jsonl", "rb").read() * 8)
    assert preprocess_data.main(_args(inp, tmp_path / "single", sp_model) + ["--no-progress"]) == 0
    result = {}
    runner = threading.Thread(target=lambda: result.update(
        summary=run_on_ray("preprocess", _args(inp, tmp_path / "ray", sp_model), num_shards=2, max_retries=3,
                           show_progress=False)))
    runner.start()
    killed = 0
    deadline = time.time() + 180
    while runner.is_alive() and time.time() < deadline and not killed:
        parts = [d for d in os.listdir(tmp_path) if d.endswith(".parts")]
        started = any(any(f.endswith(".stats.json") for f in os.listdir(tmp_path / d)) for d in parts
                      if os.path.isdir(tmp_path / d))
        procs = _shard_processes()
        if started and procs:
            procs[0].kill()
            killed += 1
        time.sleep(0.05)
    runner.join(300)
    assert killed == 1, "no shard task was caught running"
    summary = result["summary"]
    assert not summary.failed
    assert sum(r.stats["documents"] for r in summary.results) == 8 * 400  # nothing lost, nothing duplicated
    assert list(file_bytes(summary.output).values()) == \
        list(file_bytes(str(tmp_path / "single_text_document")).values())
