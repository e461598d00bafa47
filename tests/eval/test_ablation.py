"""The replay ablation (``eval/ablation.py`` and its tool): its plan, its SFT data sizes, and a tiny real run end
to end (the quickstart at toy size: one base, two points sharing one standard-SFT checkpoint, table and PNG,
resumed without rerunning)."""

from __future__ import annotations

import json
import os

import pytest

from megatron_anchor.cli.ablation_sft import main
from megatron_anchor.eval import ablation as ab
from megatron_anchor.eval.studies import QUICKSTART, quickstart_default


def test_plan_runs_what_the_targets_need_first(capsys):
    points = ab.plan([0, 1], [40, 200, 1000], ab.DEFAULT_SETTINGS)
    tiers = [s.tier_for(n) for _, s, n in points]
    assert tiers == sorted(tiers) and len(points) == len(set((seed, s.name, n) for seed, s, n in points))
    first = [(seed, s.replay, s.policy, n) for seed, s, n in points if s.tier_for(n) == 1]
    assert {(seed, 0.3, "pretrain", n) for seed in (0, 1) for n in (40, 200, 1000)} <= set(first)
    # 4x SFT data only at the lengths that see it.
    assert all(n in (200, 1000) for _, s, n in points if s.sft_factor == 4)
    assert main(["--dry-run", "--out", "x", "--seeds", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(ab.plan([0], [40, 200, 1000], ab.DEFAULT_SETTINGS))
    assert main(["--dry-run", "--settings", "nope"]) == 2


def test_more_sft_data_is_a_superset(tmp_path):
    from megatron_anchor.data.demo_corpus import write_demo_corpus

    write_demo_corpus(str(tmp_path), documents=5, sft_samples=50, seed=2)
    path = ab.sft_input(str(tmp_path), 4, seed=2)
    with open(tmp_path / "sft.jsonl") as f:
        small = f.read().splitlines()
    with open(path) as f:
        large = f.read().splitlines()
    assert len(large) == 200 and large[:50] == small and len(set(large[50:])) > 100
    assert ab.sft_input(str(tmp_path), 4, seed=2) == path and ab.sft_input(str(tmp_path), 1, 2).endswith("sft.jsonl")


def test_points_share_one_standard_run_per_length_share_and_data(tmp_path):
    out = str(tmp_path)
    default, masked, low = ab.DEFAULT_SETTINGS[1], ab.DEFAULT_SETTINGS[2], ab.DEFAULT_SETTINGS[3]
    links = {}
    for s, n in ((default, 200), (masked, 200), (low, 200), (default, 1000)):
        ab._link_standard(out, 0, s, n, ab.point_dir(out, 0, s, n))
        links[(s.name, n)] = os.path.realpath(os.path.join(ab.point_dir(out, 0, s, n), "ck_sft_standard"))
    assert links[(default.name, 200)] == links[(masked.name, 200)]  # the objective changes only anchored SFT
    assert len({links[(default.name, 200)], links[(low.name, 200)], links[(default.name, 1000)]}) == 3
    assert all(os.path.isdir(p) for p in links.values())


def test_reports_of_either_age_fill_the_table():
    """Points written before the judges were named (bare metric names) are read like today's."""
    from megatron_anchor.eval.ablation import COLUMNS, EMB, TAG, TOPIC

    new = {"gap_closed": {TAG: 0.9, TOPIC: 0.8, EMB: 0.7}, "gap_closed_well_formed": {TAG: 0.6}}
    old = {"gap_closed": {"semantic_entropy": 0.9, "topic_entropy": 0.8, "pairwise_distance": 0.7},
           "gap_closed_well_formed": {"semantic_entropy": 0.6}}
    gaps = [c for c in COLUMNS if "%" in c[0] and "well formed (%)" not in c[0] and "closed (%)" not in c[0]
            and "follow" not in c[0]]
    assert [g(new) for _, g, _ in gaps] == [g(old) for _, g, _ in gaps] == [0.9, 0.8, 0.7, None, 0.6]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.extended  # two toy quickstarts (~4 minutes); the quickstart test covers the real run
def test_tiny_ablation_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    # Toy sizes through the environment the quickstart reads: the numbers mean nothing, the plumbing is real.
    for k, v in {"DOCS": "300", "PRE_ITERS": "21"}.items():
        monkeypatch.setenv(k, v)
    out = str(tmp_path / "ab")
    argv = ["--out", out, "--seeds", "0", "--lengths", "2", "--n", "2", "--settings",
            "replay 0.3, annotations masked"]
    assert main(argv) == 0
    rows = json.load(open(os.path.join(out, "results.json")))
    assert [(r["setting"], r["length"], r["policy"], r["replay"]) for r in rows] == [
        ("replay 0.3, annotations masked", 2, "pretrain-text", 0.3)]
    assert {"base", "standard-SFT", "anchored-SFT"} == set(rows[0]["models"])
    assert "annotation_well_formed" in rows[0]["models"]["anchored-SFT"] and "gap_closed_well_formed" in rows[0]
    log = open(os.path.join(ab.point_dir(out, 0, ab.DEFAULT_SETTINGS[2], 2), "run.log")).read()
    assert "replay 30% under pretrain-text" in log and "policy sft-standard, replay 30% under pretrain" in log
    table = open(os.path.join(out, "table.md")).read()
    assert table.count("| replay 0.3, annotations masked | 2 |") == 1 and "responses follow" in table
    assert os.path.getsize(os.path.join(out, "gap_closed.png")) > 10_000
    # A rerun measures nothing again.
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("(done before)") == 1


def _report(gap: float) -> dict:
    """A point's report.json as the quickstart writes it (the fields the table and plot read)."""
    sampled = {"annotation_closed": 1.0, "annotation_well_formed": 0.9, "follows_annotation": 0.8}
    return {"gap_closed": {ab.TAG: gap, ab.TOPIC: gap, ab.EMB: gap, ab.DISTINCT: gap},
            "gap_closed_well_formed": {ab.TAG: gap, ab.EMB: gap},
            "models": {"base": dict(sampled, loss=1.2), "standard-SFT": {"loss": 0.55},
                       "anchored-SFT": dict(sampled, loss=0.4)}}


def test_results_cover_every_finished_point_whichever_run_made_it(tmp_path, capsys):
    """Results, table and plot are written from every finished point under OUT, not only from the points of the
    invocation that writes them: runs with other seeds, settings or lengths add up."""
    out = str(tmp_path)
    masked, low = ab.DEFAULT_SETTINGS[2], ab.DEFAULT_SETTINGS[3]
    for seed, s, n, gap in ((0, masked, 200, 0.88), (1, masked, 200, 0.97), (1, low, 40, 0.5)):
        os.makedirs(ab.point_dir(out, seed, s, n))
        with open(os.path.join(ab.point_dir(out, seed, s, n), "report.json"), "w") as f:
            json.dump(_report(gap), f)
    os.makedirs(os.path.join(out, "seed1", "standard"))  # other folders under a seed are not points
    assert main(["--out", out, "--seeds", "0", "--lengths", "200", "--settings", masked.name, "--report-only"]) == 0
    rows = json.load(open(os.path.join(out, "results.json")))
    assert [(r["seed"], r["setting"], r["length"]) for r in rows] == [
        (0, masked.name, 200), (1, masked.name, 200), (1, low.name, 40)]
    table = open(os.path.join(out, "table.md")).read()
    assert "Each cell: seed 0 / seed 1." in table
    assert f"| {masked.name} | 200 | 88 / 97 |" in table and f"| {low.name} | 40 | – / 50 |" in table
    assert os.path.getsize(os.path.join(out, "gap_closed.png")) > 10_000
    assert "this plan: 1 points, 0 failed; 3 finished under" in capsys.readouterr().out


def test_one_base_length_per_output_folder(tmp_path, capsys):
    """--pre-iters is recorded with the first run; another length into the same folder is refused (its points
    would share a table with points from a different base), as is a non-default length over older bases."""
    out = str(tmp_path / "a")
    assert main(["--out", out, "--pre-iters", "700", "--seeds", "0", "--report-only"]) == 0
    assert json.load(open(os.path.join(out, "ablation.json"))) == {"pre_iters": 700}
    assert main(["--out", out, "--pre-iters", "700", "--seeds", "0", "--report-only"]) == 0
    with pytest.raises(SystemExit, match="pretrained for 700 iterations, not --pre-iters 500"):
        main(["--out", out, "--pre-iters", "500", "--seeds", "0", "--report-only"])
    old = tmp_path / "b"
    (old / "seed0" / "base").mkdir(parents=True)  # bases written before the record existed: the default length
    with pytest.raises(SystemExit, match="use another --out for --pre-iters 700"):
        main(["--out", str(old), "--pre-iters", "700", "--seeds", "0", "--report-only"])
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "c"), "--pre-iters", "0"])
    assert exit_.value.code == 2 and "--pre-iters: must be >= 1" in capsys.readouterr().err


def test_the_base_length_default_is_the_quickstarts(monkeypatch):
    """The tool reads the quickstart script's own default (one place holds it), and says so when it cannot."""
    script = open(QUICKSTART).read()
    assert f'PRE_ITERS="${{PRE_ITERS:-{quickstart_default("PRE_ITERS")}}}"' in script
    monkeypatch.delenv("PRE_ITERS", raising=False)
    assert ab.default_pre_iters() == int(quickstart_default("PRE_ITERS"))
    monkeypatch.setenv("PRE_ITERS", "21")
    assert ab.default_pre_iters() == 21
    with pytest.raises(RuntimeError, match="no longer sets NO_SUCH_SETTING"):
        quickstart_default("NO_SUCH_SETTING")
