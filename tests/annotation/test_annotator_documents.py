"""Document-level requests, structured outputs and few-shot echo handling: prompt, parser, windows, and the job
against the fake server (the real server is in test_annotator_vllm.py)."""

import json

import pytest

from megatron_anchor.annotation.annotate import annotate_file
from megatron_anchor.annotation.annotate_config import AnnotateConfig
from megatron_anchor.annotation.llm.client import AnnotatorClient, ClientConfig
from megatron_anchor.annotation.llm.examples import EXAMPLE_SETS, echo_values, find_echoes, pick_example
from megatron_anchor.annotation.llm.parser import parse_document_output, parse_output
from megatron_anchor.annotation.llm.prompt import build_document_messages, plan_windows, prompt_id
from megatron_anchor.annotation.llm.structured import document_schema, rejected_structured_output
from megatron_anchor.annotation.llm.tagschema import load_schema
from tests.annotator_fixtures import FakeOpenAIServer, FakeReply, fake_tags_for, read_jsonl, write_jsonl

SCHEMA = load_schema()


def test_document_prompt_numbers_chunks_after_a_shared_prefix():
    texts = ["First paragraph about tides.", "Second <|ann|>topic:x<|/ann|> paragraph."]
    for fmt in ("lines", "json"):
        msgs = build_document_messages(texts, SCHEMA, fmt=fmt, example=1)
        last = msgs[-1]["content"]
        assert last.startswith("<<<TEXT\n[1]\nFirst paragraph") and "[2]\nSecond" in last and "<|ann|>" not in last
        # Everything before the document is identical for every request with this example set (prefix caching).
        other = build_document_messages(["Something else entirely."], SCHEMA, fmt=fmt, example=1)
        assert other[:-1] == msgs[:-1]
        # The few-shot answer is itself a well-formed document answer.
        n = len(EXAMPLE_SETS[1].chunks)
        parsed = parse_document_output(msgs[-2]["content"], SCHEMA, n)
        assert all(parsed[i].ok for i in range(1, n + 1)), parsed
    assert prompt_id(SCHEMA, "document") != prompt_id(SCHEMA, "chunk")
    with pytest.raises(ValueError):
        prompt_id(SCHEMA, "paragraph")


@pytest.mark.parametrize("answer", [
    "[1]\ntopic: tides\ngenre: notice\n[2]\ntopic: fees",
    "**[1]**\n- topic: tides\n- genre: notice\n\n**[2]**\n- topic: fees",
    "Passage 1: topic: tides; genre: notice\nPassage 2: topic: fees",
    '{"1": {"topic": "tides", "genre": "notice"}, "2": {"topic": "fees"}}',
    '```json\n{"1": {"topic": "tides", "genre": "notice"}, "2": {"topic": "fees"}}\n```',
])
def test_document_answers_map_to_chunk_numbers(answer):
    got = parse_document_output(answer, SCHEMA, 2)
    assert got[1].tags == [("topic", "tides"), ("genre", "notice")] and got[2].tags == [("topic", "fees")]


def test_missing_malformed_and_truncated_chunks_are_reported_per_number():
    got = parse_document_output("[1]\ntopic: tides\n[3]\nno tags here\n[7]\ntopic: out of range", SCHEMA, 3)
    assert got[1].ok and not got[2].ok and "missing" in got[2].problem and not got[3].ok
    cut = '{"1": {"topic": "tides"}, "2": {"topic": "fe'  # the token limit hit mid-answer
    got = parse_document_output(cut, SCHEMA, 2)
    assert got[1].tags == [("topic", "tides")] and not got[2].ok
    assert parse_document_output("topic: alone", SCHEMA, 1)[1].tags == [("topic", "alone")]
    assert not parse_document_output("", SCHEMA, 2)[2].ok
    assert parse_output('{"topic": "tides", "entities": ["Owen", "Kestrel"]}', SCHEMA).tags == [
        ("topic", "tides"), ("entities", "Owen, Kestrel")]


def test_windows_respect_both_limits():
    assert plan_windows([100] * 10, max_chunks=4, max_chars=10_000) == [(0, 4), (4, 8), (8, 10)]
    assert plan_windows([900, 900, 900, 50], max_chunks=8, max_chars=2000) == [(0, 2), (2, 4)]
    assert plan_windows([5000, 10, 10], max_chunks=8, max_chars=3000) == [(0, 1), (1, 3)]
    assert plan_windows([], 8, 3000) == []


def test_echoes_are_distinctive_example_values_absent_from_the_chunk():
    ex = EXAMPLE_SETS[0]
    assert "hive smoker preparation" in echo_values(ex) and "beekeeping" not in echo_values(ex)
    tags = [("topic", "Hive smoker  preparation"), ("domain", "beekeeping"), ("entities", "Marta Ilves")]
    assert find_echoes(tags, ex, "A poem about the sea.") == [0, 2]
    assert find_echoes(tags, ex, "Marta Ilves wrote to the paper.") == [0]  # the chunk names her: fair
    assert {pick_example(bytes([i])) for i in range(6)} == set(range(len(EXAMPLE_SETS)))
    assert pick_example(b"\x00", 1) != pick_example(b"\x00", 0)


def test_structured_schema_requires_every_chunk():
    s = document_schema(SCHEMA, 3)
    assert s["required"] == ["1", "2", "3"] and not s["additionalProperties"]
    one = s["properties"]["2"]
    assert set(one["properties"]) == {k.name for k in SCHEMA.keys} and one["required"] == ["topic"]
    assert rejected_structured_output(400, "response_format is not supported")
    assert not rejected_structured_output(400, "maximum context length exceeded")
    assert not rejected_structured_output(500, "response_format")


def _docs(n_docs=6, chunks=3):
    return [{"id": f"d{i}", "text": "\n\n".join(f"Doc {i} part {j}: the harbour at dawn." for j in range(chunks))}
            for i in range(n_docs)]


def _job(tmp_path, url, rows, name="out", **client):
    inp = write_jsonl(tmp_path / f"{name}_in.jsonl", rows)
    cfg = AnnotateConfig(input=inp, output=tmp_path / f"{name}.jsonl", annotator="vllm", progress=False,
                         client=ClientConfig(urls=[url], backoff_base_s=0.01, backoff_max_s=0.02, **client))
    return annotate_file(cfg), read_jsonl(tmp_path / f"{name}.jsonl")


def test_document_mode_sends_one_request_per_window_and_reasks_only_bad_chunks(tmp_path):
    bad = {"Doc 1 part 2: the harbour at dawn."}
    seen = {}

    def behaviour(n, text):  # chunk "Doc 1 part 2" is malformed the first time it is asked
        seen[text] = seen.get(text, 0) + 1
        return FakeReply(content="I cannot tag this.") if text in bad and seen[text] == 1 else FakeReply()

    srv = FakeOpenAIServer(behaviour).start()
    try:
        stats, out = _job(tmp_path, srv.url, _docs())
        windows = _job(tmp_path, srv.url, _docs(2, 5), name="small", window_chunks=2)[0]
        docs = [b["messages"][-1]["content"] for b in srv.bodies[:7]]
    finally:
        srv.stop()
    assert stats.failed == 0 and stats.chunks == 18 and stats.malformed == 1
    # One request per document, plus one re-ask carrying only the malformed chunk.
    reask = "<<<TEXT\n[1]\nDoc 1 part 2: the harbour at dawn.\nTEXT>>>"
    assert stats.requests == 7 and [d for d in docs if "Doc 1" in d][1] == reask
    assert windows.requests == 6  # 2 documents of 5 chunks in windows of 2, 2 and 1
    topic = fake_tags_for("Doc 1 part 2: the harbour at dawn.").split("\n")[0][len("topic: "):]
    assert out[1]["chunks"][2]["tags"][0] == ["topic", topic]
    assert all(b["response_format"]["type"] == "json_schema" for b in srv.bodies)  # auto: the server took it


def test_structured_auto_falls_back_when_the_server_refuses_it(tmp_path):
    srv = FakeOpenAIServer(structured=False).start()
    try:
        stats, out = _job(tmp_path, srv.url, _docs(3))
        bodies = list(srv.bodies)
    finally:
        srv.stop()
    assert stats.failed == 0 and all(c["tags"] for d in out for c in d["chunks"])
    assert all("response_format" not in b for b in bodies)  # the refused request never reached the log
    srv = FakeOpenAIServer(structured=False).start()
    try:
        stats, _ = _job(tmp_path, srv.url, _docs(2), name="strict", structured="on")
    finally:
        srv.stop()
    assert stats.failed == stats.chunks and "HTTP 400" in stats.reasons


def test_a_refused_window_is_split_until_the_refused_chunk_is_alone(tmp_path):
    poison = "Doc 2 part 1: the harbour at dawn."
    srv = FakeOpenAIServer(lambda n, t: FakeReply(status=400) if t == poison else FakeReply()).start()
    try:
        stats, out = _job(tmp_path, srv.url, _docs(4, 4))
    finally:
        srv.stop()
    assert stats.failed == 1 and stats.reasons == {"HTTP 400": 1}
    failed = read_jsonl(tmp_path / "out.jsonl.failed.jsonl")
    assert [e["chunk"] for e in failed[0]["annotation_errors"]] == [1] and len(out) == 3


@pytest.mark.parametrize("policy, dropped, reasked", [("keep", 0, 0), ("drop", 4, 0), ("reask", 0, 4)])
def test_echo_policy(tmp_path, policy, dropped, reasked):
    # The first answer per chunk copies one distinctive value of each example set: exactly one of them is an
    # echo of the set that request showed.
    copied = [("topic", EXAMPLE_SETS[0].chunks[0][1][0][1]), ("entities", "Owen Treloar"),
              ("action", "describes a game move by move")]
    answers = {}

    def behaviour(n, text):
        answers[text] = answers.get(text, 0) + 1
        if answers[text] == 1:
            return FakeReply(content="\n".join(f"{k}: {v}" for k, v in copied) + "\ngenre: harbour story")
        return FakeReply()

    srv = FakeOpenAIServer(behaviour).start()
    try:
        stats, out = _job(tmp_path, srv.url, _docs(2, 2), request_mode="chunk", echo_policy=policy,
                          structured="off")
    finally:
        srv.stop()
    assert stats.echoed == 4 and stats.echo_dropped == dropped and stats.echo_reasked == reasked
    tags = [c["tags"] for d in out for c in d["chunks"]]
    if policy == "keep":
        assert all(len(t) == 4 for t in tags)
    elif policy == "drop":
        assert all(len(t) == 3 for t in tags)
    else:  # asked again with another example set: the fresh answers copy nothing
        assert not {v for t in tags for _, v in t} & {v for _, v in copied}


def test_document_mode_cache_rerun_makes_no_requests(tmp_path):
    srv = FakeOpenAIServer().start()
    try:
        first, out1 = _job(tmp_path, srv.url, _docs())
        n = len(srv.bodies)
        again, out2 = _job(tmp_path, srv.url, _docs(), name="out")  # same output: complete, nothing to do
        inp = tmp_path / "out_in.jsonl"
        cfg = AnnotateConfig(input=inp, output=tmp_path / "fresh.jsonl", annotator="vllm", progress=False,
                             cache_path=tmp_path / "out.jsonl.cache.sqlite",
                             client=ClientConfig(urls=[srv.url]))
        rerun = annotate_file(cfg)
    finally:
        srv.stop()
    assert first.requests == n and rerun.requests == 0 and rerun.cached == first.chunks
    assert (tmp_path / "fresh.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


def test_client_window_api_counts_requests_and_tokens():
    srv = FakeOpenAIServer().start()

    async def go():
        async with AnnotatorClient(ClientConfig(urls=[srv.url]), SCHEMA) as c:
            return await c.annotate_window(["a tide table", "a fee notice", "a dredging notice"], b"\x01")

    import asyncio

    try:
        res = asyncio.run(go())
    finally:
        srv.stop()
    assert res.requests == 1 and res.tokens == 36 and all(a.ok for a in res.annotations)
    assert json.loads(json.dumps([a.tags for a in res.annotations]))


@pytest.mark.parametrize("structured", [True, False])
def test_a_cut_document_answer_keeps_only_whole_chunks(structured):
    """In a window's cut answer, complete JSON chunk objects are kept; a free-text answer's last section may be cut
    (sections have no closing mark), so it is asked again too. The chunks asked again go with twice the cap, at
    the same temperature, and nothing counts as malformed."""
    texts = ["a tide table", "a fee notice", "a dredging notice"]

    def behaviour(n, text):  # the first window's answer is cut in chunk 2's tags (JSON) or just after one (text)
        return FakeReply(cut_at=None if n >= 3 else (90 if structured else 70))

    srv = FakeOpenAIServer(behaviour, structured=structured).start()

    async def go():
        cfg = ClientConfig(urls=[srv.url], structured="on" if structured else "off", max_tokens=50)
        async with AnnotatorClient(cfg, SCHEMA) as c:
            return await c.annotate_window(texts, b"\x01")

    import asyncio

    try:
        res = asyncio.run(go())
        bodies = list(srv.bodies)
        asked = list(srv.requests)
    finally:
        srv.stop()
    assert all(a.ok for a in res.annotations) and sum(a.malformed for a in res.annotations) == 0
    assert [a.tags for a in res.annotations] == [parse_output(fake_tags_for(t), SCHEMA).tags for t in texts]
    assert asked[:3] == texts and asked[3:] == texts[1:]  # chunk 1 was whole; chunks 2 and 3 asked again
    assert [b["max_tokens"] for b in bodies] == [54 * 3, 54 * 2 * 2]
    assert [b["temperature"] for b in bodies] == [0.0, 0.0]
    assert [a.truncated for a in res.annotations] == [1, 1, 1]


def test_the_job_counts_answers_cut_at_the_token_cap(tmp_path):
    """Cut answers are counted per chunk they carried, apart from malformed ones, and named in the summary."""
    from megatron_anchor.annotation.annotate_config import format_summary

    seen = set()

    def behaviour(n, text):  # every document's first answer is cut after its first chunk's tags
        first = text.endswith("part 0: the harbour at dawn.") and text not in seen
        seen.add(text)
        return FakeReply(cut_at=70 if first else None)

    srv = FakeOpenAIServer(behaviour).start()
    try:
        stats, out = _job(tmp_path, srv.url, _docs(4))
    finally:
        srv.stop()
    assert stats.failed == 0 and stats.malformed == 0 and stats.truncated == 4 * 3 and stats.requests == 8
    assert all(c["tags"] for d in out for c in d["chunks"])
    cfg = AnnotateConfig(input=tmp_path / "out_in.jsonl", output=tmp_path / "out.jsonl")
    assert "cut at the token cap: 12 (asked again with a larger cap)" in format_summary(stats, cfg)
