"""The annotate job's input from SFT samples and its output back (the first stage of preprocess_sft's
``--annotator vllm``, whose end-to-end run with a server is in test_sft_preprocess.py)."""

from __future__ import annotations

import json

import pytest

from megatron_anchor.annotation.schema import DocumentError
from megatron_anchor.data.sft_annotate import write_annotated_sft, write_job_input


def test_samples_round_trip_through_the_job_files(tmp_path):
    src = tmp_path / "sft.jsonl"
    src.write_text(json.dumps({"prompt": "p1", "response": "r1"}) + "\n\n"
                   + "not json\n" + json.dumps({"prompt": "p2", "response": "r2"}) + "\n")
    with pytest.raises(DocumentError, match="sft.jsonl:3"):
        write_job_input(str(src), str(tmp_path / "job.jsonl"))
    assert not (tmp_path / "job.jsonl").exists()  # nothing half-written under the final name
    assert write_job_input(str(src), str(tmp_path / "job.jsonl"), skip_bad_samples=True) == 1
    docs = [json.loads(x) for x in (tmp_path / "job.jsonl").read_text().splitlines()]
    assert [(d["sft_line"], [c["text"] for c in d["chunks"]]) for d in docs] == [(1, ["r1"]), (4, ["r2"])]
    # What the job writes: the same documents with every chunk tagged.
    for d, topic in zip(docs, ("a", "b")):
        d["chunks"][0]["tags"] = [["topic", topic]]
    (tmp_path / "out.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    write_annotated_sft(str(tmp_path / "out.jsonl"), str(src), str(tmp_path / "annotated.jsonl"))
    rows = [json.loads(x) for x in (tmp_path / "annotated.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["response"], r["annotation"]) for r in rows] == [
        ("p1", "r1", [["topic", "a"]]), ("p2", "r2", [["topic", "b"]])]
