"""docker/compose.yaml validates with a real Compose implementation, no Docker engine needed.

The validator is docker-compose 1.29 (Debian: ``apt-get install docker-compose``; its ``config`` command
resolves interpolation and checks the file against the Compose schema without contacting an engine). Base
images cannot be pulled on CPU machines, so building and running stay out of scope. The test is skipped, saying
so, when the validator is not installed.
"""

import os
import shutil
import subprocess

import pytest
import yaml

from tests.paths import REPO

COMPOSE = os.path.join(REPO, "docker", "compose.yaml")
VALIDATOR = shutil.which("docker-compose")

needs_validator = pytest.mark.skipif(VALIDATOR is None, reason="docker-compose (apt-get install docker-compose) "
                                                                "is not installed")


def _config(path, env=None):
    return subprocess.run([VALIDATOR, "-f", path, "config"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@needs_validator
def test_compose_file_validates_and_wires_the_jobs(tmp_path):
    r = _config(COMPOSE, {"DATA_DIR": str(tmp_path), "GPU_COUNT": "2"})
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    services = cfg["services"]
    assert set(services) == {"annotator", "annotate", "preprocess"}
    # The annotation job waits for a healthy server, preprocessing for a finished annotation job.
    assert services["annotate"]["depends_on"]["annotator"]["condition"] == "service_healthy"
    assert services["preprocess"]["depends_on"]["annotate"]["condition"] == "service_completed_successfully"
    assert "--url=http://annotator:8000" in services["annotate"]["command"]
    # Interpolation reached the resolved file; the containers' own shell variables were left to the shell
    # (``config`` prints them escaped again, as ``$$``, so its output is itself a valid compose file).
    assert services["annotate"]["volumes"][0].startswith(str(tmp_path) + ":/data")
    assert services["annotator"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] in (2, "2")
    assert '"$$TOKENIZER_MODEL"' in services["preprocess"]["command"][-1]
    for name in ("annotator", "annotate"):
        dockerfile = services[name]["build"]["dockerfile"]
        assert os.path.isfile(os.path.join(REPO, dockerfile)), dockerfile


@needs_validator
def test_validator_rejects_a_broken_file(tmp_path):
    """The check has teeth: an unknown service option and a bad dependency condition are refused."""
    with open(COMPOSE, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    bad = dict(cfg, services=dict(cfg["services"]))
    bad["services"]["annotate"] = dict(cfg["services"]["annotate"], restart_policy="always")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = _config(str(path))
    assert r.returncode != 0 and "restart_policy" in r.stderr
    bad["services"]["annotate"] = dict(cfg["services"]["annotate"], depends_on={"annotator": {"condition": "up"}})
    path.write_text(yaml.safe_dump(bad))
    assert _config(str(path)).returncode != 0
