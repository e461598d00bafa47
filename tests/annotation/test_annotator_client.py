"""The OpenAI-compatible client against a fake server and a fault-injecting proxy (all on loopback)."""

import asyncio
import multiprocessing
import sqlite3
import threading

import pytest

from megatron_anchor.annotation.format import tag_problem
from megatron_anchor.annotation.llm.response_cache import AnnotationCache, chunk_hash
from megatron_anchor.annotation.llm.client import (
    AnnotatorClient,
    ClientConfig,
    Secret,
    load_api_key,
)
from megatron_anchor.annotation.llm.tagschema import load_schema
from megatron_anchor.annotation.llm.transport import normalize_url
from tests.annotator_fixtures import FakeOpenAIServer, FakeReply, FaultProxy, fake_tags_for, free_port

SCHEMA = load_schema()
FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05, cooldown_s=0.05, request_timeout_s=5.0)


def run(urls, texts, **kw):
    """Annotate ``texts`` with a fresh client; returns (results, client)."""
    cfg = ClientConfig(urls=urls, **{**FAST, **kw})

    async def go():
        async with AnnotatorClient(cfg, SCHEMA) as client:
            return await client.annotate_many(texts), client

    return asyncio.run(go())


def texts(n):
    return [f"Chunk number {i} about the harbour at Lyon." for i in range(n)]


def test_annotates_and_discovers_the_model(fake_server):
    results, client = run([fake_server.url + "/v1/"], texts(5))
    assert client.model == "fake-model"
    for t, r in zip(texts(5), results):
        assert r.ok and r.attempts == 1 and r.tokens == 12
        assert all(tag_problem(k, v) is None for k, v in r.tags)
    assert [r.tags[0] for r in results] == [("topic", fake_tags_for(t).split("\n")[0][7:]) for t in texts(5)]
    assert sorted(fake_server.requests) == sorted(texts(5))  # the server saw exactly the chunks, unframed


def test_retries_5xx_and_429_then_succeeds():
    fates = {0: 500, 1: 503, 2: 429, 3: 502}
    srv = FakeOpenAIServer(lambda n, t: FakeReply(status=fates.get(n, 200))).start()
    try:
        results, _ = run([srv.url], ["one chunk"], max_attempts=5)
    finally:
        srv.stop()
    assert results[0].ok and results[0].attempts == 5 and results[0].retries == 4


def test_gives_up_with_the_reason_after_max_attempts():
    srv = FakeOpenAIServer(lambda n, t: FakeReply(status=500)).start()
    try:
        results, _ = run([srv.url], ["a", "b"], max_attempts=3)
    finally:
        srv.stop()
    for r in results:
        assert not r.ok and r.tags is None and r.error == "HTTP 500" and r.attempts == 3
        assert "gave up after 3 attempts" in r.detail


def test_4xx_is_final_without_retry():
    srv = FakeOpenAIServer(lambda n, t: FakeReply(status=400)).start()
    try:
        results, _ = run([srv.url], ["x"], max_attempts=5)
    finally:
        srv.stop()
    assert results[0].error == "HTTP 400" and results[0].attempts == 1 and "injected" in results[0].detail


def test_unparseable_answers_are_retried_then_fail_with_the_reason():
    replies = iter(["I am sorry, I cannot.", "topic: recovered"])
    srv = FakeOpenAIServer(lambda n, t: FakeReply(content=next(replies))).start()
    try:
        ok, _ = run([srv.url], ["x"], model="m", parse_retries=2)
    finally:
        srv.stop()
    assert ok[0].tags == [("topic", "recovered")] and ok[0].attempts == 2

    srv = FakeOpenAIServer(lambda n, t: FakeReply(content="no tags here")).start()
    try:
        bad, _ = run([srv.url], ["x"], model="m", parse_retries=2)
    finally:
        srv.stop()
    assert bad[0].error == "unparseable output" and bad[0].attempts == 3 and "no key: value" in bad[0].detail


def test_huge_and_malformed_bodies():
    srv = FakeOpenAIServer(lambda n, t: FakeReply(content="topic: " + "z" * 3_000_000)).start()
    try:
        big, _ = run([srv.url], ["x"], model="m", max_response_bytes=1 << 20)
    finally:
        srv.stop()
    assert big[0].error == "response too large"

    bodies = iter([b"<html>oops</html>", b'{"choices": []}'])
    srv = FakeOpenAIServer(lambda n, t: FakeReply(raw_body=next(bodies, None))).start()
    try:
        res, _ = run([srv.url], ["x"], model="m")
    finally:
        srv.stop()
    assert res[0].ok and res[0].attempts == 3


def test_round_robin_and_failover_to_live_replicas():
    a, b = FakeOpenAIServer().start(), FakeOpenAIServer().start()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        results, _ = run([a.url, dead, b.url], texts(40), model="fake-model", concurrency=4)
    finally:
        a.stop()
        b.stop()
    assert all(r.ok for r in results)
    assert len(a.requests) >= 10 and len(b.requests) >= 10  # both replicas shared the load
    assert len(a.requests) + len(b.requests) == 40


def test_concurrency_is_bounded():
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    class Counting(FakeOpenAIServer):
        async def _chat(self, request):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            try:
                await asyncio.sleep(0.02)
                return await super()._chat(request)
            finally:
                with lock:
                    state["now"] -= 1

    srv = Counting().start()
    try:
        results, _ = run([srv.url], texts(60), concurrency=5)
    finally:
        srv.stop()
    assert all(r.ok for r in results)
    assert 2 <= state["peak"] <= 5


def test_stalls_time_out_and_are_retried():
    srv = FakeOpenAIServer(lambda n, t: FakeReply(delay_s=3.0 if n < 2 else 0.0)).start()
    try:
        results, _ = run([srv.url], ["x"], model="m", request_timeout_s=0.5, max_attempts=5)
    finally:
        srv.stop()
    assert results[0].ok and results[0].attempts >= 3  # (more only if the loaded machine is slow)


def test_proxy_faults_are_retried_through(fake_server):
    """500s, dropped connections, stalls and truncated bodies between client and a healthy server."""
    cycle = ["500", "ok", "drop", "stall", "ok", "truncate", "429", "ok", "503", "ok"]
    proxy = FaultProxy(fake_server.url, lambda n: cycle[n % len(cycle)], stall_s=2.0).start()
    try:
        chunks = texts(30)
        results, _ = run([proxy.url], chunks, model="fake-model", request_timeout_s=1.0, max_attempts=12,
                         concurrency=6)
    finally:
        proxy.stop()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert sum(r.retries for r in results) >= len(proxy.fates) - 30
    assert {"500", "drop", "stall", "truncate", "429", "503"} <= set(proxy.fates)
    assert [r.tags[0][1] for r in results] == [fake_tags_for(c).split("\n")[0][7:] for c in chunks]


def test_backoff_grows_with_full_jitter():
    client = AnnotatorClient(ClientConfig(urls=["http://127.0.0.1:1"], backoff_base_s=0.5, backoff_max_s=4.0), SCHEMA)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0)]:
        delays = [client._backoff(failures, None) for _ in range(200)]
        assert 0 <= min(delays) and max(delays) <= ceiling
        assert max(delays) > ceiling / 2  # spread, not a constant
    assert client._backoff(1, retry_after=3.0) >= 3.0


def test_api_key_from_env_or_file_is_sent_but_never_shown(tmp_path, monkeypatch, fake_server):
    monkeypatch.setenv("ANNOTATOR_API_KEY", "sk-env-123")
    assert load_api_key().reveal() == "sk-env-123"
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-file-456\n")
    key = load_api_key(str(keyfile))
    assert key.reveal() == "sk-file-456"
    cfg = ClientConfig(urls=[fake_server.url], api_key=key)
    for shown in (repr(key), str(key), repr(cfg), str(cfg), f"{key}"):
        assert "sk-file-456" not in shown
    results, _ = run([fake_server.url], ["x"], api_key=key)
    assert results[0].ok and fake_server.auth_headers == ["Bearer sk-file-456"]
    keyfile.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_api_key(str(keyfile))
    monkeypatch.delenv("ANNOTATOR_API_KEY")
    assert load_api_key() is None
    assert not Secret("")


def test_normalize_url():
    assert normalize_url("127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert normalize_url("https://h/v1") == "https://h"


def test_cache_roundtrip_and_keys(tmp_path):
    path = tmp_path / "c.sqlite"
    h = chunk_hash("some chunk")
    with AnnotationCache(path, "model-a", "p1", flush_every=2) as c:
        c.put(h, [("topic", "x")], tokens=7)
        assert c.get(h) == [("topic", "x")]
        assert len(c) == 1
    with AnnotationCache(path, "model-a", "p1") as c:
        assert c.get_many([h, chunk_hash("other")]) == {h: [("topic", "x")]}
    with AnnotationCache(path, "model-b", "p1") as c:  # another model: a miss
        assert c.get(h) is None
    with AnnotationCache(path, "model-a", "p2") as c:  # another prompt version: a miss
        assert c.get(h) is None


def _hammer_cache(folder: str, worker: int, files: int, barrier) -> None:
    """One process of the contention test: for each fresh file, create it at the same moment as the others
    (the WAL switch races), then look up and write."""
    for f in range(files):
        barrier.wait(60)
        keys = [chunk_hash(f"{worker}-{j}") for j in range(6)]
        with AnnotationCache(f"{folder}/c{f}.sqlite", "m", "p", flush_every=2, busy_timeout=0.05) as c:
            c.get_many(keys)
            for j, h in enumerate(keys):
                c.put(h, [("w", str(worker)), ("n", str(j))])


def test_cache_shared_by_processes_loses_nothing(tmp_path):
    """Shards of one run share a cache file and open it together: processes that create the file at the same
    moment (SQLite reports the WAL-switch race as "locked" without waiting) and write at once must all
    succeed, and every row must be there."""
    ctx = multiprocessing.get_context("spawn")
    workers, files = 4, 12
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_hammer_cache, args=(str(tmp_path), w, files, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers
    for f in range(files):
        with AnnotationCache(tmp_path / f"c{f}.sqlite", "m", "p") as c:
            assert len(c) == workers * 6
            assert c.get(chunk_hash("3-5")) == [("w", "3"), ("n", "5")]


def test_cache_waits_for_a_held_lock_then_fails_clearly(tmp_path):
    path = tmp_path / "held.sqlite"
    with AnnotationCache(path, "m", "p"):
        pass
    holder = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.0, holder.rollback)
    release.start()
    try:  # the lock outlasts SQLite's busy handler several times over; the retries outlast the lock
        with AnnotationCache(path, "m", "p", flush_every=1, busy_timeout=0.1, timeout=30) as c:
            c.put(chunk_hash("x"), [("k", "v")])
            assert c.get(chunk_hash("x")) == [("k", "v")]
    finally:
        release.join()
    c = AnnotationCache(path, "m", "p", flush_every=1, busy_timeout=0.1, timeout=0.5)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match=r"held\.sqlite.*another process holds"):
            c.put(chunk_hash("y"), [("k", "v")])
    finally:
        holder.rollback()
        holder.close()
    c.close()  # the write that failed is still pending, and lands now that the lock is free
    with AnnotationCache(path, "m", "p") as c:
        assert c.get(chunk_hash("y")) == [("k", "v")]


def test_an_answer_cut_at_the_token_cap_is_asked_again_with_room_to_finish():
    """A cut answer (finish_reason "length") is never parsed for tags: its last value may be cut mid-word. The same
    question goes again at the same temperature with twice the cap, up to max_tokens_growth times the cap; past
    that the answer counts as unparseable and is re-asked as such."""
    full = "topic: Suez Canal construction\ngenre: history"
    replies = iter([FakeReply(content=full, cut_at=13), FakeReply(content=full)])
    srv = FakeOpenAIServer(lambda n, t: next(replies)).start()
    try:
        ok, _ = run([srv.url], ["x"], model="m", max_tokens=40)
        bodies = list(srv.bodies)
    finally:
        srv.stop()
    # the first answer, "topic: Suez C", would have parsed into a cut value
    assert ok[0].tags == [("topic", "Suez Canal construction"), ("genre", "history")]
    assert ok[0].truncated == 1 and ok[0].malformed == 0 and ok[0].attempts == 2
    assert [b["max_tokens"] for b in bodies] == [40, 80]
    assert [b["temperature"] for b in bodies] == [0.0, 0.0]  # greedy again: the same answer, finished

    srv = FakeOpenAIServer(lambda n, t: FakeReply(content=full, cut_at=13)).start()
    try:
        bad, _ = run([srv.url], ["x"], model="m", max_tokens=40, max_tokens_growth=4, parse_retries=1)
        bodies = list(srv.bodies)
    finally:
        srv.stop()
    assert not bad[0].ok and bad[0].error == "unparseable output" and "cut at the token cap (160" in bad[0].detail
    assert [b["max_tokens"] for b in bodies] == [40, 80, 160, 160]
    assert [b["temperature"] for b in bodies] == [0.0, 0.0, 0.0, 0.7]
    assert bad[0].truncated == 4 and bad[0].malformed == 2
