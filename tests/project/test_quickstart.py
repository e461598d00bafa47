"""The quickstart end to end at reduced size: anchored SFT keeps more diversity than standard SFT, by independent
judges as well as by the training annotator, with its ability kept.

The run is the script at its default corpus and training size, with its default pretraining replay in both SFT
runs, fewer samples per prompt (24 instead of 32) and one temperature; it takes ~8 minutes on a loaded 2-core
machine (pretraining shorter than the default did not bind text to annotations reliably; see the comment in the
test). It asserts on held-out prompts, with margins well above the sampling noise of the measures (plug-in entropy
over 8 prompts x 24 samples varies by about +-0.1 bit between seeds):

- standard SFT collapses: by every judge its diversity is well below the base model's;
- anchored SFT keeps clearly more diversity than standard SFT by both independent judges (distinct classes,
  embedding distance) and by the training annotator, over all samples and over well-formed samples only;
- the anchored model's annotations are well formed and its responses follow them (format and binding);
- both SFT runs replayed pretraining documents and logged the SFT and replay losses separately;
- the three checkpoints export, and their ability on the designed multiple-choice task (lm-eval) is reported;
  anchored SFT's is not below standard SFT's by more than the task's noise.
"""

import json
import os
import random
import subprocess
import sys

import pytest

from megatron_anchor.annotation.default_annotator import annotate_text
from megatron_anchor.data import demo_corpus as dc
from megatron_anchor.eval.quickstart import format_table, gap_closed
from tests.paths import REPO

QUICKSTART = os.path.join(REPO, "examples", "quickstart.sh")
# Thresholds sit a few noise widths (~0.1 bit) below what the runs measured with the default replay (full size,
# seed 0: tag entropy collapse 0.63 bit, anchored advantage 0.58 bit, 93% of the gap closed, 98% of annotations
# well formed, 98% of responses following them; without replay the collapse was 0.95 bit).
MIN_COLLAPSE_BITS = 0.35
MIN_ANCHORED_ADVANTAGE_BITS = 0.3
MIN_GAP_CLOSED = 0.5
MIN_INDEPENDENT_GAP_CLOSED = 0.2
MIN_WELL_FORMED = 0.9
MIN_FOLLOWS = 0.8
MAX_ABILITY_DROP = 0.05  # below standard SFT, in accuracy (200 questions: standard error ~0.02)


def test_corpus_topics_are_what_the_annotator_extracts():
    """Every designed chunk is tagged with its own topic and genre; instructions carry no topic."""
    rng = random.Random(0)
    for topic in dc.TOPICS:
        for genre in dc.TEMPLATES:
            for _ in range(10):
                tags = dict(annotate_text(dc.chunk(rng, topic, genre)))
                assert (tags["topic"], tags["genre"]) == (topic, genre)
    for prompt in dc.SFT_PROMPTS + dc.HELDOUT_PROMPTS:
        assert dict(annotate_text(prompt))["topic"] == "general", prompt
    assert not set(dc.SFT_PROMPTS) & set(dc.HELDOUT_PROMPTS)


def test_corpus_shape(tmp_path):
    """Pretraining chunks span all topics; SFT responses cover only the narrow slice."""
    paths = dc.write_demo_corpus(str(tmp_path), documents=300, sft_samples=200, seed=3)
    with open(paths["raw"]) as f:
        chunks = [c for line in f for c in json.loads(line)["text"].split("\n\n")]
    topics = {dict(annotate_text(c))["topic"] for c in chunks}
    assert set(dc.TOPICS) <= topics
    with open(paths["sft"]) as f:
        sft = [json.loads(line) for line in f]
    assert {dict(annotate_text(s["response"]))["topic"] for s in sft} == set(dc.SFT_TOPICS)
    assert {s["prompt"] for s in sft} <= set(dc.SFT_PROMPTS)


def test_calibration_pairs_are_held_out(tmp_path):
    """The distinct-class threshold is calibrated on chunks that no model trained on or is scored against."""
    from megatron_anchor.eval.judges import read_calibration_pairs

    paths = dc.write_demo_corpus(str(tmp_path), documents=200, sft_samples=50, seed=1, calibration=300)
    seen = dc.corpus_chunks(str(tmp_path))
    same, different = read_calibration_pairs(paths["calibration"])
    assert len(same) == len(different) == 300
    assert not {c for pair in same + different for c in pair} & seen
    # A chunk the corpus holds is never drawn: exclude every chunk of the first draws and they change.
    first, _ = dc.calibration_pairs(5)
    again, _ = dc.calibration_pairs(5, exclude={c for pair in first for c in pair})
    assert not {c for pair in first for c in pair} & {c for pair in again for c in pair}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x", "b": "y", "same": true}\n{"a": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_calibration_pairs(str(bad))


def test_the_split_adapts_to_the_number_of_sequences():
    from megatron_anchor.eval.quickstart_stages import adaptive_split

    assert adaptive_split(12000) == "11760,240,0"  # 2%, as the old fixed 98,2,0
    assert adaptive_split(15) == "14,1,0"  # the packed SFT set of 100 samples: at least one sequence
    assert adaptive_split(7) is None  # too few to hold any out: validation skipped
    with pytest.raises(ValueError, match="no sequences"):
        adaptive_split(0)
    for n in (8, 9, 49, 50, 51, 99, 1000, 10 ** 7):  # megatron-core's rounding gives each split what was asked
        train, valid, _ = map(int, adaptive_split(n).split(","))
        assert valid >= 1 and train + valid == n and int(round(valid / n * n)) == valid


def test_knobs_refuse_bad_values_by_name():
    from megatron_anchor.eval.quickstart_stages import KNOBS, check_knobs

    assert check_knobs({k.name: k.small for k in KNOBS}) == []
    errors = check_knobs({"N": "1", "TEMPS": "0.7 x", "SFT_REPLAY": "1", "DOCS": "0", "PRE_ITERS": "2.5",
                          "SFT_REPLAY_POLICY": "text", "NO_SUCH": "1", "SEED": ""})
    assert [e.split(":")[0] for e in errors] == ["N=1", "TEMPS=0.7 x", "SFT_REPLAY=1", "DOCS=0", "PRE_ITERS=2.5",
                                                 "SFT_REPLAY_POLICY=text", "NO_SUCH"]


def test_every_knob_is_documented_and_checked_by_the_script():
    from megatron_anchor.eval.quickstart_stages import KNOBS

    script = open(QUICKSTART).read()
    header = script.split("set -euo pipefail")[0]
    check = script[script.index("quickstart knobs"):].split("\nmkdir")[0]
    for knob in KNOBS:
        assert knob.name in header, f"{knob.name} is not documented in the script's header"
        assert f'{knob.name}="$' in check, f"the script does not check {knob.name}"


def _dry_run(tmp_path, env):
    from tests.project.test_examples import _configs

    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "DRY_RUN": "1", **env}
    r = subprocess.run(["bash", QUICKSTART, str(tmp_path / "qs")], env=full, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr, _configs(r.stdout)


@pytest.mark.integration
def test_dry_run_with_every_knob_small(tmp_path):
    """Every knob at a small value at once: the data stages run for real, the trainer checks each launch (flags,
    data, splits) and the report its inputs; validation adapts to tiny datasets or is skipped with a line."""
    from megatron_anchor.eval.quickstart_stages import KNOBS

    small = {k.name: k.small for k in KNOBS}
    out, configs = _dry_run(tmp_path, small)
    pre, std, anc = configs
    assert pre["training"]["train_iters"] == 3 and pre["training"]["lr_warmup_iters"] == 0
    assert pre["model"]["position_embedding_type"] == "learned_absolute"  # ARCH=gpt2
    assert pre["model"]["hidden_dropout"] == pre["model"]["attention_dropout"] == 0.05
    assert pre["training"]["lr"] == 1e-4 and pre["training"]["min_lr"] == pytest.approx(1e-5)
    import sentencepiece as spm

    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "qs" / "tokenizer.model")).get_piece_size() == 400
    assert pre["data"]["split"] == "59,1,0"  # 60 documents: one for validation
    for cfg, policy in ((std, "sft-standard"), (anc, "sft-anchored")):
        assert cfg["training"]["train_iters"] == 1 and cfg["training"]["lr"] == 1e-6
        assert cfg["training"]["loss_mask_policy"] == policy and cfg["data"]["replay_share"] == 0.05
        assert cfg["data"]["split"] == "1,0,0", cfg["data"]  # one packed sequence: no validation
        assert cfg["training"]["seed"] == 3 and cfg["data"]["reset_position_ids"]  # learned positions restart
    assert anc["training"]["replay_loss_mask_policy"] == "pretrain-text"
    assert out.count("validation skipped:") == 2
    assert "report (dry run): 32 held-out prompts x 2 samples x 2 temperatures (0.5, 1)" in out


@pytest.mark.integration
def test_dry_run_of_a_small_run_that_once_stopped_at_sft(tmp_path):
    """100 SFT samples pack into a dozen or two sequences: a fixed 98,2,0 split left validation empty and the
    trainer refused it; the split now holds one sequence out."""
    from megatron_anchor.data.indexed import read_index_header

    out, configs = _dry_run(tmp_path, {"DOCS": "2000", "PRE_ITERS": "60", "SFT_ITERS": "5", "SFT_SAMPLES": "100",
                                       "N": "4"})
    sizes = [read_index_header(str(tmp_path / "qs" / f"sft_{k}_text_document.idx")).sequence_count
             for k in ("standard", "anchored")]
    assert all(8 <= n < 25 for n in sizes), sizes  # 2% of them rounds to no sequence at all
    assert [c["data"]["split"] for c in configs] == ["1960,40,0"] + [f"{n - 1},1,0" for n in sizes]
    assert configs[0]["training"]["lr_warmup_iters"] == 6
    for cfg in configs:  # the defaults: Llama-shaped, no dropout; RoPE needs no position reset in SFT
        assert cfg["model"]["position_embedding_type"] == "rope" and cfg["model"]["swiglu"]
        assert cfg["model"]["hidden_dropout"] == 0 and not cfg["data"]["reset_position_ids"]


def test_the_tokenizer_keeps_every_topic_word_whole(tmp_path):
    """The quickstart's tokenizer (its default vocabulary size, trained on text and annotation text as stage 3 does)
    encodes every topic cue word as one piece: a topic word spelled letter by letter shares its first pieces with
    other topics' words, and responses on those topics follow their annotation less."""
    import sentencepiece as spm

    from megatron_anchor.eval.quickstart_stages import write_tokenizer_text
    from megatron_anchor.tokenizer.train import train_sentencepiece
    from megatron_anchor.cli import annotate

    from megatron_anchor.eval.studies import quickstart_default

    vocab = int(quickstart_default("VOCAB"))
    paths = dc.write_demo_corpus(str(tmp_path), documents=12000, sft_samples=10, seed=0, calibration=1)
    assert annotate.main(["--input", paths["raw"], "--output", str(tmp_path / "annotated.jsonl"), "--no-progress"]) == 0
    write_tokenizer_text(str(tmp_path / "annotated.jsonl"), str(tmp_path / "text.jsonl"))
    with open(tmp_path / "text.jsonl") as f:
        model = train_sentencepiece((json.loads(line)["text"] for line in f), str(tmp_path / "tok"), vocab)
    sp = spm.SentencePieceProcessor(model_file=model)
    split = [w for words in dc.TOPICS.values() for w in words if len(sp.encode_as_pieces(" " + w)) > 1]
    assert split in ([], ["journey"]), split  # 'j' is too rare a letter to get a piece of its own


def test_gap_closed():
    assert gap_closed(4.0, 2.0, 3.5) == pytest.approx(0.75)
    assert gap_closed(4.0, 4.0, 3.0) is None and gap_closed(None, 1.0, 2.0) is None


def test_readme_update_replaces_only_the_marked_table(tmp_path):
    from megatron_anchor.eval.quickstart import PLOT_IN_REPO, README_BEGIN, README_END, update_readme

    work = tmp_path / "work"
    work.mkdir()
    (work / "report.md").write_text("| new | table |\n")
    (work / "pareto.png").write_bytes(b"png")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_BEGIN}\n| old |\n{README_END}\noutro\n")
    update_readme(str(work), str(readme), str(tmp_path))
    assert readme.read_text() == f"intro\n{README_BEGIN}\n| new | table |\n{README_END}\noutro\n"
    assert (tmp_path / PLOT_IN_REPO).read_bytes() == b"png"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        update_readme(str(work), str(readme), str(tmp_path))


@pytest.mark.integration
@pytest.mark.slow
def test_quickstart_reduced_anchored_keeps_diversity(tmp_path):
    work = tmp_path / "qs"
    # Pretraining must be long enough for the model to bind text to its annotation: the base model's responses
    # followed their own sampled topic in ~6% of samples after 250 iterations, ~52% after 450 and ~98% after 500
    # on seed 0. Without that binding there is nothing for anchored SFT to keep. The script's default, 800, binds
    # every seed measured (docs/sft.md); on this test's seed 500 binds at 99%, so the run is shortened there and in
    # the number of samples only.
    env = {**os.environ, "DOCS": "12000", "PRE_ITERS": "500", "SFT_SAMPLES": "600", "SFT_ITERS": "40",
           "N": "24", "TEMPS": "1.0", "MASTER_PORT": str(29700 + os.getpid() % 200), "PYTHONUNBUFFERED": "1"}
    env.pop("JUDGE_URL", None)
    r = subprocess.run(["bash", os.path.join(REPO, "examples", "quickstart.sh"), str(work)], env=env,
                       capture_output=True, text=True, timeout=3600)  # ~8 min on 2 idle cores, 35 busy
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    with open(work / "report.json") as f:
        report = json.load(f)
    table = format_table(report)
    sys.stdout.write(table + "\n")
    assert any(line.startswith("share of the base") for line in r.stdout.splitlines()), r.stdout[-2000:]
    m = report["models"]
    head = {k: m[k]["headline"] for k in m}
    base, std, anc = (head[k]["annotator:attribute_entropy"] for k in ("base", "standard-SFT", "anchored-SFT"))
    assert base - std >= MIN_COLLAPSE_BITS, table
    assert anc - std >= MIN_ANCHORED_ADVANTAGE_BITS, table
    assert report["gap_closed"]["annotator:attribute_entropy"] >= MIN_GAP_CLOSED, table
    # The independent judges lead the table and agree on the direction: collapse, and anchored above standard.
    independent = [j["id"] for j in report["judges"] if j["independent"]]
    assert independent[:2] == ["distinct", "embedding"] and "quality" in independent, report["judges"]
    assert not next(j for j in report["judges"] if j["id"] == "annotator")["independent"]
    for key in ("distinct:distinct", "embedding:pairwise_distance"):
        assert head["base"][key] > head["standard-SFT"][key], (key, table)
        assert report["gap_closed"][key] >= MIN_INDEPENDENT_GAP_CLOSED, (key, table)
    assert 1 < head["base"]["distinct:distinct"] < 24, table  # the calibrated threshold does not saturate
    # The anchored model samples well-formed annotations and its responses mostly follow them.
    assert m["anchored-SFT"]["annotation_closed"] >= 0.9, table
    assert m["anchored-SFT"]["annotation_well_formed"] >= MIN_WELL_FORMED, table
    assert m["anchored-SFT"]["follows_annotation"] >= MIN_FOLLOWS, table
    assert report["gap_closed_well_formed"]["annotator:attribute_entropy"] >= MIN_GAP_CLOSED, table
    # Both SFT runs replayed pretraining documents (the default) and logged each source's loss.
    assert r.stdout.count("replay 30% under pretrain") == 2, r.stdout[-2000:]
    assert sum("| sft loss: " in line and "| replay loss: " in line for line in r.stdout.splitlines()) >= 2
    # Every checkpoint exported; ability measured by lm-eval, and kept.
    for name in m:
        assert os.path.isfile(os.path.join(m[name]["export"], "model.safetensors"))
    assert m["anchored-SFT"]["ability"] >= m["standard-SFT"]["ability"] - MAX_ABILITY_DROP, table
    assert os.path.getsize(work / "pareto.png") > 1000
    assert "| model | sampling | distinct classes | embedding distance |" in (work / "report.md").read_text()
