"""The annotate job and tools/annotate.py: streaming, schema, cache reuse, failures with reasons, resume after kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_anchor.annotation.default_annotator import annotate_text
from megatron_anchor.annotation.schema import parse_line
from tests.annotator_fixtures import FakeOpenAIServer, FakeReply, fake_tags_for, read_jsonl, write_jsonl
from megatron_anchor.cli import annotate as annotate_tool
from tests.paths import REPO_DIR as REPO


def make_raw(path, n_docs=40, seed=0):
    """Raw documents of 1-5 paragraphs, some repeated paragraphs (shared boilerplate) and unicode."""
    rows = []
    for i in range(n_docs):
        paras = [f"Paragraph {j} of document {i}: the chef in Lyon baked bread, \u00e9t\u00e9 \u2603." for j in range(1 + (i + seed) % 5)]
        if i % 4 == 0:
            paras.append("Subscribe to our newsletter!")
        rows.append({"id": f"d{i}", "text": "\n\n".join(paras), "meta": {"n": i}})
    return write_jsonl(path, rows), rows


def check_output(out_path, rows):
    """Every input document appears once, in order, fully annotated, with its text intact."""
    out = read_jsonl(out_path)
    assert [d["id"] for d in out] == [r["id"] for r in rows]
    for i, (d, r) in enumerate(zip(out, rows), 1):
        doc = parse_line(json.dumps(d).encode(), f"out:{i}")
        assert doc.annotated and doc.text == r["text"] and doc.meta == r["meta"]
        assert all(c.tags for c in doc.chunks)
    return out


def vllm_args(url, inp, out, *extra):
    return ["--annotator", "vllm", "--url", url, "--input", str(inp), "--output", str(out), "--no-progress",
            "--backoff-base", "0.01", "--backoff-max", "0.05", *extra]


def test_default_annotator_end_to_end(tmp_path, capsys):
    inp, rows = make_raw(tmp_path / "raw.jsonl")
    out = tmp_path / "ann.jsonl"
    assert annotate_tool.main(["--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    docs = check_output(out, rows)
    assert docs[0]["chunks"][0]["tags"] == [list(t) for t in annotate_text(docs[0]["chunks"][0]["text"])]
    err = capsys.readouterr().err
    assert "40 documents" in err and "failed:    0 chunks" in err
    # A finished job is not redone, and an output without a checkpoint is never clobbered.
    assert annotate_tool.main(["--input", str(inp), "--output", str(out), "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().err
    os.remove(str(out) + ".progress.json")
    assert annotate_tool.main(["--input", str(inp), "--output", str(out), "--no-progress"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_vllm_annotator_with_cache_rerun(tmp_path, fake_server, capsys):  # noqa: F811
    inp, rows = make_raw(tmp_path / "raw.jsonl")
    out = tmp_path / "ann.jsonl"
    assert annotate_tool.main(vllm_args(fake_server.url, inp, out)) == 0
    docs = check_output(out, rows)
    first = docs[1]["chunks"][0]
    assert first["tags"][0] == ["topic", fake_tags_for(first["text"]).split("\n")[0][7:]]
    n_chunks = sum(len(d["chunks"]) for d in docs)
    unique = len({c["text"] for d in docs for c in d["chunks"]})
    assert len(fake_server.requests) == unique  # identical chunks are asked once
    assert "cached: %d" % (n_chunks - unique) in capsys.readouterr().err

    # Rerun from scratch with the same cache: not one request, byte-identical output.
    before = out.read_bytes()
    assert annotate_tool.main(vllm_args(fake_server.url, inp, out, "--overwrite")) == 0
    assert len(fake_server.requests) == unique and out.read_bytes() == before
    assert f"annotated: 0   cached: {n_chunks}" in capsys.readouterr().err


def test_failures_are_listed_with_reasons_and_can_be_retried(tmp_path, capsys):
    inp, rows = make_raw(tmp_path / "raw.jsonl", 12)
    with open(inp, "a") as f:
        f.write('{"text": 5}\nnot json at all\n\n')
    poison = {"Paragraph 1 of document 3", "Paragraph 0 of document 7"}

    def behaviour(n, text):
        if any(text.startswith(p) for p in poison):
            return FakeReply(status=400)
        if text.startswith("Paragraph 2 of document 4"):
            return FakeReply(content="Sorry, I can't help with that.")
        return FakeReply()

    srv = FakeOpenAIServer(behaviour).start()
    out = tmp_path / "ann.jsonl"
    try:
        assert annotate_tool.main(vllm_args(srv.url, inp, out)) == 0
        assert annotate_tool.main(vllm_args(srv.url, inp, tmp_path / "strict.jsonl", "--strict")) == 2
    finally:
        srv.stop()
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "unparseable output" in err and "bad input" in err
    good = read_jsonl(out)
    failed = read_jsonl(str(out) + ".failed.jsonl")
    assert [d["id"] for d in good] == [r["id"] for r in rows if r["id"] not in ("d3", "d4", "d7")]
    assert [d.get("id") for d in failed] == ["d3", "d4", "d7", None, None]
    by_id = {d.get("id"): d for d in failed}
    assert by_id["d3"]["annotation_errors"] == [{"chunk": 1, "reason": "HTTP 400", "detail": by_id["d3"]["annotation_errors"][0]["detail"]}]
    assert by_id["d3"]["chunks"][1].get("tags") is None and by_id["d3"]["chunks"][0]["tags"]
    assert by_id["d4"]["annotation_errors"][0]["reason"] == "unparseable output"
    assert [d["line"] for d in failed[3:]] == [13, 14]
    assert "13" in failed[3]["annotation_errors"][0]["detail"]

    # Feed the failed documents back to a healthy server: exactly the failed chunks are requested.
    retry_srv = FakeOpenAIServer().start()
    try:
        assert annotate_tool.main(vllm_args(retry_srv.url, str(out) + ".failed.jsonl", tmp_path / "retry.jsonl")) == 0
    finally:
        retry_srv.stop()
    retried = read_jsonl(tmp_path / "retry.jsonl")
    assert [d["id"] for d in retried] == ["d3", "d4", "d7"]
    assert all("annotation_errors" not in d and all(c["tags"] for c in d["chunks"]) for d in retried)
    assert len(retry_srv.requests) == 3


def test_progress_for_another_input_or_a_changed_output_is_refused(tmp_path, capsys):
    inp, _ = make_raw(tmp_path / "a.jsonl", 5)
    other, _ = make_raw(tmp_path / "b.jsonl", 6, seed=1)
    out = tmp_path / "o.jsonl"
    assert annotate_tool.main(["-i", str(inp), "-o", str(out), "--no-progress"]) == 0
    assert annotate_tool.main(["-i", str(other), "-o", str(out), "--no-progress"]) == 1
    assert "belongs to another input" in capsys.readouterr().err
    out.write_text("")
    assert annotate_tool.main(["-i", str(inp), "-o", str(out), "--no-progress"]) == 1
    assert "shorter" in capsys.readouterr().err


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path):
    """SIGKILL the annotate process at several points; reruns finish the job; the output equals a clean run."""
    inp, rows = make_raw(tmp_path / "raw.jsonl", 150)
    # Slow enough that the job (document-level requests, 4 in flight: ~40 rounds) is still running at every kill.
    srv = FakeOpenAIServer(delay_s=0.1).start()
    try:
        clean = tmp_path / "clean.jsonl"
        assert annotate_tool.main(vllm_args(srv.url, inp, clean, "--cache", str(tmp_path / "clean.sqlite"))) == 0
        out = tmp_path / "out.jsonl"
        cmd = [sys.executable, str(REPO / "tools" / "annotate.py"),
               *vllm_args(srv.url, inp, out, "--concurrency", "4", "--checkpoint-every", "0.05")]
        kills = 0
        for delay in (0.8, 1.0, 1.2, 1.5, 2.0):
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    finally:
        srv.stop()
    assert kills >= 2, "the job finished before it could be killed: make it slower"
    check_output(out, rows)
    assert out.read_bytes() == clean.read_bytes()
    state = json.loads(Path(str(out) + ".progress.json").read_text())
    assert state["complete"] and state["stats"]["documents"] == len(rows)
    assert state["stats"]["chunks"] == sum(len(d["chunks"]) for d in read_jsonl(out))


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        annotate_tool.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = annotate_tool.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
        for opt in action.option_strings:
            assert opt in text


def test_flags_reach_their_config_fields(monkeypatch):
    """Every flag declared against a field of AnnotateConfig or ClientConfig lands in that field (a flag whose dest
    no field holds would be dropped silently): each is given a value other than its default."""
    import dataclasses

    from megatron_anchor.annotation.llm.client import ClientConfig

    seen = []

    def capture(cfg):  # stands in for the job: keep the config, stop as Ctrl-C would
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(annotate_tool, "annotate_file", capture)
    monkeypatch.delenv("ANNOTATOR_API_KEY", raising=False)
    argv = ["-i", "in.jsonl", "-o", "out.jsonl", "--text-key", "body", "--overwrite", "--limit", "5",
            "--checkpoint-every", "3", "--no-progress", "--num-shards", "4", "--shard-index", "2",
            "--annotator", "vllm", "--schema", "s.yaml", "--cache", "c.sqlite", "--no-cache",
            "--url", "http://a:1,http://b:2", "--url", "http://c:3", "--model", "m", "--concurrency", "5",
            "--window", "7", "--timeout", "9", "--connect-timeout", "2", "--max-attempts", "3", "--retry-budget", "50",
            "--backoff-base", "0.1", "--backoff-max", "4", "--parse-retries", "1", "--max-tokens", "64",
            "--max-tokens-growth", "2", "--temperature", "0.3", "--max-chunk-chars", "999", "--request-mode", "chunk",
            "--window-chunks", "3", "--window-chars", "500", "--structured-output", "off", "--echo-policy", "drop"]
    assert annotate_tool.main(argv) == 130
    (cfg,) = seen
    assert (cfg.input, cfg.output, cfg.text_key, cfg.overwrite, cfg.limit, cfg.checkpoint_every_s, cfg.progress,
            cfg.num_shards, cfg.shard_index, cfg.annotator, cfg.schema_path, cfg.cache_path, cfg.use_cache,
            cfg.window) == (Path("in.jsonl"), Path("out.shard00002-of-00004.jsonl"), "body", True, 5, 3.0, False,
                            4, 2, "vllm", Path("s.yaml"), Path("c.sqlite"), False, 7)
    want = dict(urls=["http://a:1", "http://b:2", "http://c:3"], model="m", concurrency=5, request_timeout_s=9.0,
                connect_timeout_s=2.0, max_attempts=3, retry_budget_s=50.0, backoff_base_s=0.1, backoff_max_s=4.0,
                parse_retries=1, max_tokens=64, max_tokens_growth=2, temperature=0.3, max_chunk_chars=999,
                request_mode="chunk", window_chunks=3, window_chars=500, structured="off", echo_policy="drop")
    defaults = ClientConfig(urls=[])
    for name, value in want.items():
        assert getattr(cfg.client, name) == value, name
        assert getattr(defaults, name) != value, f"{name}: pick a value other than the default"
    untouched = {f.name for f in dataclasses.fields(ClientConfig)} - set(want) - {"api_key"}
    assert all(getattr(cfg.client, n) == getattr(defaults, n) for n in untouched)
