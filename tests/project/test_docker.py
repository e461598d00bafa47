"""Container images: every Dockerfile passes hadolint, and installs the package the way the README says."""

import glob
import os
import re
import subprocess

import pytest

from tests.paths import REPO

DOCKERFILES = sorted(glob.glob(os.path.join(REPO, "docker", "*Dockerfile*")))


def test_there_are_dockerfiles():
    names = {os.path.basename(p) for p in DOCKERFILES}
    assert {"train.Dockerfile", "annotator.Dockerfile"} <= names


@pytest.mark.parametrize("path", DOCKERFILES, ids=os.path.basename)
def test_hadolint_is_clean(path):
    r = subprocess.run(["hadolint", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_training_image_installs_like_the_readme():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    docker = open(os.path.join(REPO, "docker", "train.Dockerfile"), encoding="utf-8").read()
    install = re.search(r'pip install (--no-cache-dir )?-c (\S+) -e "(\.\[[a-z,]+\])"', docker)
    assert install, "the training image must install the package with a constraints file, editable, with extras"
    assert f'-e "{install.group(3)}"' in readme


def test_training_image_refuses_a_transformer_engine_older_than_its_pairing(monkeypatch):
    from megatron_anchor.training import model

    docker = open(os.path.join(REPO, "docker", "train.Dockerfile"), encoding="utf-8").read()
    minimum = re.search(r"ARG MIN_TE_VERSION=(\S+)", docker).group(1)
    assert "require_transformer_engine" in docker and re.search(r"ARG MEGATRON_CORE_VERSION=0\.19\.\d+", docker)
    monkeypatch.setattr(model, "transformer_engine_version", lambda: "2.7.0")
    with pytest.raises(SystemExit, match=r"Transformer Engine 2\.7\.0.*>= " + re.escape(minimum)):
        model.require_transformer_engine(minimum)
    monkeypatch.setattr(model, "transformer_engine_version", lambda: "2.11.0+abc")
    assert model.require_transformer_engine(minimum) == "2.11.0+abc"
