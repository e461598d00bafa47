"""The binding study tool: its table from finished points, resumption, and the quickstart defaults it reads."""

from __future__ import annotations

import json
import os

from megatron_anchor.eval import studies
from tools import binding_study


def _point(out, arch, it, seed, follows, minutes=3.0):
    work = studies.point_dir(str(out), arch, it, seed)
    os.makedirs(work)
    with open(os.path.join(work, "binding.json"), "w") as f:
        json.dump({"arch": arch, "pre_iters": it, "seed": seed, "follows_annotation": follows,
                   "annotation_closed": 1.0, "annotation_well_formed": 0.99, "base_minutes": minutes,
                   "load_before": "1.5 1.2 1.0"}, f)


def test_table_from_finished_points_and_nothing_rerun(tmp_path, capsys):
    _point(tmp_path, "gpt2", 500, 0, 0.97)
    _point(tmp_path, "gpt2", 500, 2, 0.42, 3.4)
    _point(tmp_path, "llama", 500, 0, 0.99)
    table = studies.binding_table(studies.finished_points(str(tmp_path)))
    lines = table.splitlines()
    assert lines[2] == "| gpt2 | 500 | s0 97 / s2 42 | 42 | 100 | 99 | 3.0-3.4 | 1.5 |"
    assert lines[3].startswith("| llama | 500 | s0 99 | 99 |")
    # Finished points are read, not rerun (a rerun would need the quickstart and fail here).
    assert binding_study.main(["--out", str(tmp_path), "--arch", "gpt2", "--seeds", "0", "2",
                               "--pre-iters", "500"]) == 0
    assert "| gpt2 | 500 | s0 97 / s2 42 |" in open(tmp_path / "binding.md").read()
    assert binding_study.main(["--out", str(tmp_path / "empty"), "--report-only"]) == 0


def test_the_study_reads_the_quickstart_defaults():
    script = open(studies.QUICKSTART).read()
    for name in ("PRE_ITERS", "N", "ARCH"):
        assert f'{name}="${{{name}:-{studies.quickstart_default(name)}}}"' in script
