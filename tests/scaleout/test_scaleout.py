"""Sharded data tools, alone and on a local Ray instance: the same output as the single-process tools, retried
after a worker dies."""

import os
import threading
import time

import psutil
import pytest

from tests.conftest import file_bytes
from megatron_anchor.cli import preprocess_data

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


@pytest.mark.integration
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


@pytest.mark.integration
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


def _raw_with_a_bad_line(corpus_dir, tmp_path):
    lines = open(corpus_dir / "raw.jsonl", "rb").read().splitlines(keepends=True)[:120]
    lines.insert(50, b"{not json\n")
    lines.insert(80, b"\n")
    path = tmp_path / "raw.jsonl"
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_annotate_shards_concatenate_to_the_unsharded_output(corpus_dir, tmp_path, num_shards):
    from megatron_anchor.sharding import shard_path
    from megatron_anchor.cli import annotate

    inp = _raw_with_a_bad_line(corpus_dir, tmp_path)
    assert annotate.main(["--input", str(inp), "--output", str(tmp_path / "single.jsonl"), "--no-progress"]) == 0
    out = str(tmp_path / "sharded.jsonl")
    for i in range(num_shards):
        assert annotate.main(["--input", str(inp), "--output", out, "--no-progress",
                              "--num-shards", str(num_shards), "--shard-index", str(i)]) == 0
    names = [shard_path(out, num_shards, i) if num_shards > 1 else out for i in range(num_shards)]
    for suffix in ("", ".failed.jsonl"):
        got = b"".join(open(n + suffix, "rb").read() for n in names)
        assert got == open(str(tmp_path / "single.jsonl") + suffix, "rb").read()
    failed = open(str(tmp_path / "single.jsonl.failed.jsonl"), encoding="utf-8").read()
    assert '"line": 51' in failed  # the bad line, numbered in the whole file


@pytest.mark.integration
def test_ray_annotate_equals_single_process(local_ray, corpus_dir, tmp_path):
    from megatron_anchor.scaleout.ray_runner import run_on_ray
    from megatron_anchor.cli import annotate

    inp = _raw_with_a_bad_line(corpus_dir, tmp_path)
    assert annotate.main(["--input", str(inp), "--output", str(tmp_path / "single.jsonl"), "--no-progress"]) == 0
    summary = run_on_ray("annotate", ["--input", str(inp), "--output", str(tmp_path / "ray.jsonl")], num_shards=3,
                         show_progress=False)
    assert not summary.failed and summary.output == str(tmp_path / "ray.jsonl")
    assert sum(r.stats["documents"] for r in summary.results) == 120
    for suffix in ("", ".failed.jsonl"):
        assert open(str(tmp_path / "ray.jsonl") + suffix, "rb").read() == \
            open(str(tmp_path / "single.jsonl") + suffix, "rb").read()


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.slow
def test_ray_annotate_against_the_real_vllm_server(local_ray, vllm_server, corpus_dir, tmp_path):  # noqa: F811
    """Two Ray shard tasks annotate through the real server; the single-process tool, reading the same cache,
    writes the same file, so the sharded run produced exactly the single-process dataset."""
    from megatron_anchor.scaleout.ray_runner import run_on_ray
    from megatron_anchor.cli import annotate

    inp = tmp_path / "raw.jsonl"
    # Four documents, two per shard: each is one document-level request of several chunks to the real server.
    inp.write_bytes(b"".join(open(corpus_dir / "raw.jsonl", "rb").read().splitlines(keepends=True)[:4]))
    common = ["--input", str(inp), "--annotator", "vllm", "--url", vllm_server.url, "--cache",
              str(tmp_path / "cache.sqlite"), "--concurrency", "8"]
    summary = run_on_ray("annotate", common + ["--output", str(tmp_path / "ray.jsonl")], num_shards=2,
                         show_progress=False)
    assert not summary.failed
    assert sum(r.stats["annotated"] for r in summary.results) > 0  # the server did the work
    assert annotate.main(common + ["--output", str(tmp_path / "single.jsonl"), "--no-progress"]) == 0
    assert open(tmp_path / "ray.jsonl", "rb").read() == open(tmp_path / "single.jsonl", "rb").read()


@pytest.mark.integration
def test_ray_preprocess_sft_equals_single_process(local_ray, sp_model, tmp_path):
    from megatron_anchor.scaleout.ray_runner import run_on_ray
    from tests.data.test_sft_preprocess import sft_argv, write_sft_jsonl
    from megatron_anchor.cli import preprocess_sft

    inp = write_sft_jsonl(str(tmp_path / "sft.jsonl"), 120)
    assert preprocess_sft.main(sft_argv(sp_model, inp, tmp_path / "single")) == 0
    args = [a for a in sft_argv(sp_model, inp, tmp_path / "ray") if a != "--no-progress"]
    summary = run_on_ray("preprocess_sft", args, num_shards=3, show_progress=False)
    assert not summary.failed
    assert list(file_bytes(summary.output).values()) == \
        list(file_bytes(str(tmp_path / "single_text_document")).values())
