"""The dataset, trainer and generation tests against the megatron-core line that GPU images install.

CI's own environment has megatron-core 0.16.1 (the newest release for Python 3.11); NGC PyTorch images (Python
3.12) get 0.17-0.19, and the role channel, the packed-sequence path, the trainer and its mixed-precision and
distributed-optimizer checkpoints lean on internals that moved between them. ``tools/setup_megatron_core_env.sh`` builds (once, cached) an environment with 0.19.2, and this test
runs those test files there, in their own process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from megatron_anchor.wheelhouse import MEGATRON_CORE_PY312
from tests.distributed import REPO_ROOT

INNER_TESTS = ["tests/data/test_anchor_dataset.py", "tests/training/test_packing.py",
               "tests/training/test_trainer_parallel.py", "tests/training/test_mixed_precision.py",
               "tests/inference/test_generate.py"]
VERSION = MEGATRON_CORE_PY312  # the release the GPU acceptance run's wheelhouse carries for Python 3.12


@pytest.fixture(scope="module")
def mcore_python():
    r = subprocess.run(["bash", os.path.join(REPO_ROOT, "tools", "setup_megatron_core_env.sh")], cwd=REPO_ROOT,
                       env=dict(os.environ, MCORE_VERSION=VERSION, PYTHON=sys.executable), capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1].split("=", 1)[1]


@pytest.mark.integration
@pytest.mark.slow
def test_dataset_trainer_and_generation_tests_pass_on_megatron_core_019(mcore_python):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    version = subprocess.run([mcore_python, "-c", "import megatron.core; print(megatron.core.__version__)"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert version.stdout.strip() == VERSION, version.stderr[-2000:]
    r = subprocess.run([mcore_python, "-m", "pytest", *INNER_TESTS, "-q", "-p", "no:cacheprovider", "-x"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=2400)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, f"megatron-core {VERSION}:\n{tail}"
    assert " passed" in tail and " failed" not in tail


@pytest.mark.parametrize("script, pattern", [
    ("tools/setup_megatron_core_env.sh", r"DEPS=\((.*?)\)"),  # the megatron-core 0.19 test environment
])
def test_other_environments_have_every_runtime_dependency(script, pattern):
    """Scripts that install the project's dependencies themselves list all of setup.py's install_requires
    (megatron-core aside where it is installed on its own), so a new dependency cannot be missing there while CI's
    own environment has it. (The GPU acceptance run reads setup.py itself: megatron_anchor.wheelhouse.)"""
    def name(req: str) -> str:
        return re.split(r"[<>=!~\[ ]", req.strip().strip('"'), maxsplit=1)[0].lower()

    with open(os.path.join(REPO_ROOT, "setup.py")) as f:
        block = re.search(r"install_requires=\[(.*?)\]", f.read(), re.S).group(1)
    required = {name(r) for r in re.findall(r'"([^"]+)"', block)} - {"megatron-core", "torch"}
    with open(os.path.join(REPO_ROOT, script)) as f:
        listed = re.search(pattern, f.read(), re.S).group(1)
    names = {name(d) for d in listed.replace("\\", " ").split() if d and not d.startswith("$")}
    assert required and required <= names, f"{script} lacks {sorted(required - names)}"
