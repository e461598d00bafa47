"""The quickstart end to end at reduced size: anchored SFT keeps more tag entropy than standard SFT.

The reduced run (fewer documents and iterations than ``examples/quickstart.sh``'s defaults, the same script)
takes ~4 minutes on 2 cores. It asserts on held-out prompts, with margins far above the sampling noise of
the measure (plug-in entropy over 8 prompts x 24 samples varies by about +-0.1 bit between seeds):

- standard SFT collapses: its tag entropy is well below the base model's (otherwise the comparison is void);
- anchored SFT keeps clearly more tag entropy than standard SFT, and closes most of the gap.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measured margins of the reduced run are reported in the module docstring of megatron_anchor/eval/quickstart.py
# and README; these thresholds sit several noise widths below them.
MIN_COLLAPSE_BITS = 0.5
MIN_ANCHORED_ADVANTAGE_BITS = 0.4
MIN_GAP_CLOSED = 0.5


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


def test_gap_closed():
    assert gap_closed(4.0, 2.0, 3.5) == pytest.approx(0.75)
    assert gap_closed(4.0, 4.0, 3.0) is None and gap_closed(None, 1.0, 2.0) is None


@pytest.mark.slow
def test_quickstart_reduced_anchored_keeps_diversity(tmp_path):
    work = tmp_path / "qs"
    env = {**os.environ, "DOCS": "3000", "PRE_ITERS": "250", "SFT_SAMPLES": "600", "SFT_ITERS": "40",
           "N": "24", "MASTER_PORT": str(29700 + os.getpid() % 200), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(["bash", os.path.join(REPO, "examples", "quickstart.sh"), str(work)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    with open(work / "report.json") as f:
        report = json.load(f)
    table = format_table(report)
    sys.stdout.write(table + "\n")
    assert table.splitlines()[-3].startswith("share of the base") and "model" in r.stdout
    m = report["models"]
    base, std, anc = (m[k]["semantic_entropy"] for k in ("base", "standard-SFT", "anchored-SFT"))
    assert base - std >= MIN_COLLAPSE_BITS, table
    assert anc - std >= MIN_ANCHORED_ADVANTAGE_BITS, table
    assert report["gap_closed"]["semantic_entropy"] >= MIN_GAP_CLOSED, table
    # The anchored model samples well-formed annotations and its responses mostly follow them.
    assert m["anchored-SFT"]["annotation_closed"] >= 0.9, table
