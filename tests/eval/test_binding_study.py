"""The binding study tool: its table from finished points, resumption, and the quickstart defaults it reads."""

from __future__ import annotations

import json
import os

import pytest

from megatron_anchor.eval import studies
from megatron_anchor.cli import binding_study


def _point(out, settings, seed, follows, minutes=3.0):
    work = studies.point_dir(str(out), settings, seed)
    os.makedirs(work)
    with open(os.path.join(work, "binding.json"), "w") as f:
        json.dump({"variant": studies.variant_name(settings), "settings": settings, "seed": seed,
                   "follows_annotation": follows,
                   "annotation_closed": 1.0, "annotation_well_formed": 0.99, "base_minutes": minutes,
                   "load_before": "1.5 1.2 1.0"}, f)


def test_table_from_finished_points_and_nothing_rerun(tmp_path, capsys):
    gpt2 = {"ARCH": "gpt2", "PRE_ITERS": "700"}
    _point(tmp_path, gpt2, 0, 0.97)
    _point(tmp_path, gpt2, 2, 0.42, 3.4)
    _point(tmp_path, {}, 0, 0.99)
    table = studies.binding_table(studies.finished_points(str(tmp_path)))
    lines = table.splitlines()
    assert lines[2].startswith("| default | s0 99 | 99 |")  # the defaults first
    assert lines[3] == "| ARCH=gpt2 PRE_ITERS=700 | s0 97 / s2 42 | 42 | 100 | 99 | 3.0-3.4 | 1.5 |"
    # Finished points are read, not rerun (a rerun would need the quickstart and fail here).
    assert binding_study.main(["--out", str(tmp_path), "--variants", "PRE_ITERS=700 ARCH=gpt2", "--seeds", "0",
                               "2"]) == 0
    assert "| ARCH=gpt2 PRE_ITERS=700 | s0 97 / s2 42 |" in open(tmp_path / "binding.md").read()
    assert binding_study.main(["--out", str(tmp_path / "empty"), "--report-only"]) == 0


def test_variants_are_checked_against_the_quickstart_knobs(capsys):
    assert studies.parse_variant("") == {} and studies.variant_name({}) == "default"
    assert studies.parse_variant("DROPOUT=0.1 ARCH=gpt2") == {"DROPOUT": "0.1", "ARCH": "gpt2"}
    for bad, words in (("ARCH=gpt3", "ARCH=gpt3: must be one of"), ("PRE_ITERS", "not NAME=VALUE"),
                       ("SEED=3", "set by the study"), ("NOPE=1", "not a setting")):
        with pytest.raises(ValueError, match=words):
            studies.parse_variant(bad)
    with pytest.raises(SystemExit):
        binding_study.main(["--variants", "ARCH=gpt3"])
    assert "ARCH=gpt3" in capsys.readouterr().err


def test_the_study_reads_the_quickstart_defaults():
    script = open(studies.QUICKSTART).read()
    for name in ("PRE_ITERS", "N", "ARCH", "DROPOUT", "VOCAB"):
        assert f'{name}="${{{name}:-{studies.quickstart_default(name)}}}"' in script
