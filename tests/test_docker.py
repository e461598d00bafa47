"""Container images: every Dockerfile passes hadolint, and installs the package the way the README says."""

import glob
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
