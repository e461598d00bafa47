"""The installed package alone runs every tool: a non-editable install into a folder, used with only that folder on
PYTHONPATH and from outside the checkout, has each console script (``--help`` answers), ``python -m`` entry points,
and the modules the Ray runner's tasks import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.paths import REPO


# Runs in the installed copy: every console script's entry point answers --help (exit 0, its usage line), and the
# Ray runner's stages name tool modules that import and have main().
PROBE = textwrap.dedent("""
    import contextlib, importlib, importlib.metadata as md, io, json, sys
    import megatron_anchor
    from megatron_anchor.cli import CONSOLE_SCRIPTS
    from megatron_anchor.scaleout.ray_runner import STAGES, run_shard

    target = sys.argv[1]
    (dist,) = list(md.distributions(name="megatron-anchor", path=[target]))
    eps = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
    helps = {}
    for name, ep in sorted(eps.items()):
        sys.argv = [name]
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = ep.load()(["--help"])
            except SystemExit as e:
                code = e.code
        helps[name] = [code, out.getvalue().splitlines()[0] if out.getvalue() else ""]
    stages = {name: callable(importlib.import_module(s.module).main) for name, s in STAGES.items()}
    print(json.dumps({"package": megatron_anchor.__file__, "scripts": CONSOLE_SCRIPTS,
                      "entry_points": {n: ep.value for n, ep in eps.items()}, "helps": helps, "stages": stages,
                      "run_shard": run_shard.__module__}))
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``pip install --no-deps --target`` of a copy of the sources setup.py packages (so the build writes nothing
    into the checkout); returns (the target folder, an environment whose PYTHONPATH is that folder only)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    shutil.copytree(os.path.join(REPO, "megatron_anchor"), src / "megatron_anchor",
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = root / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", "--target", str(target), str(src)], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    return target, env


def test_every_console_script_answers_help_from_the_installed_package(installed, tmp_path):
    target, env = installed
    r = subprocess.run([sys.executable, "-c", PROBE, str(target)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.splitlines()[-1])
    assert found["package"].startswith(str(target)), found["package"]  # not the checkout, not an editable install
    expected = {name: f"megatron_anchor.cli.{module}:main" for name, module in found["scripts"].items()}
    assert found["entry_points"] == expected
    for name, (code, first_line) in found["helps"].items():
        assert code == 0 and first_line.startswith(f"usage: {name}"), (name, code, first_line)
    assert found["stages"] == {"preprocess": True, "preprocess_sft": True, "annotate": True}
    assert found["run_shard"] == "megatron_anchor.scaleout.ray_runner"


def test_installed_script_and_module_run_as_processes(installed, tmp_path):
    """The generated ``bin/`` script and ``python -m megatron_anchor.cli.X`` both start the tool (one of each: the
    entry points themselves are all checked in-process above)."""
    target, env = installed
    script = target / "bin" / "anchor-make-synthetic-corpus"
    assert script.is_file()
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: anchor-make-synthetic-corpus"), r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "megatron_anchor.cli.make_synthetic_corpus", "--output",
                        str(tmp_path / "c.jsonl"), "--documents", "3"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 3
