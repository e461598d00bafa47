"""Format and binding beside diversity: well-formed annotations, responses that follow them, and diversity
over well-formed samples only; in the evaluation harness on a real checkpoint's samples."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN, serialize_annotation
from megatron_anchor.eval import binding


def _ann(tags, closed=True, text=None):
    """An annotation as the sampler returns it (body text without delimiters, parsed tags, closed flag)."""
    body = serialize_annotation(tags)[len(ANN_OPEN): -len(ANN_CLOSE)] if text is None else text
    return {"text": body, "tags": [list(t) for t in tags], "closed": closed}


GOOD = _ann([("topic", "cooking"), ("genre", "recipe")])


def test_well_formed_means_closed_and_exactly_serialised():
    assert binding.annotation_problem(GOOD) is None
    assert binding.annotation_problem(None) is None  # plain sampling: nothing to break
    assert "did not close" in binding.annotation_problem({**GOOD, "closed": False})
    assert "no key:value tag" in binding.annotation_problem(_ann([], text="cooking and more"))
    assert "not the serialisation" in binding.annotation_problem(_ann([("topic", "cooking")],
                                                                      text="topic:cooking; stray words"))
    assert "lower-case identifier" in binding.annotation_problem(_ann([], text="Topic Name!:x"))
    given = {"tags": [["topic", "cooking"]], "closed": True, "given": True}  # conditioned mode: tags only
    assert binding.annotation_problem(given) is None


def test_follows_needs_a_well_formed_annotation_and_matching_keys():
    assert binding.follows_annotation(GOOD, [("topic", "Cooking"), ("genre", "list")])  # only topic counts
    assert not binding.follows_annotation(GOOD, [("topic", "travel")])
    assert not binding.follows_annotation({**GOOD, "closed": False}, [("topic", "cooking")])
    assert not binding.follows_annotation(_ann([("genre", "recipe")]), [("topic", "cooking")])  # names no key
    assert binding.follows_annotation(GOOD, [("genre", "recipe")], keys=("genre",))
    assert not binding.follows_annotation(None, [("topic", "cooking")])


def test_shares_over_annotated_samples():
    anns = [GOOD, {**GOOD, "closed": False}, _ann([("topic", "music")]), None]
    tags = [[("topic", "cooking")], [("topic", "cooking")], [("topic", "travel")], [("topic", "x")]]
    assert binding.binding(anns, tags) == {"annotation_closed": pytest.approx(2 / 3),
                                           "annotation_well_formed": pytest.approx(2 / 3),
                                           "follows_annotation": pytest.approx(1 / 3)}
    assert binding.binding([None, None], tags[:2]) == {"annotation_closed": None, "annotation_well_formed": None,
                                                       "follows_annotation": None}


def test_well_formed_subsets_leave_out_prompts_with_fewer_than_two():
    from megatron_anchor.eval.harness import well_formed_responses

    def rows(*anns):
        return [{"annotation": a, "response_judged": f"r{i}"} for i, a in enumerate(anns)]

    bad = {**GOOD, "closed": False}
    prompts = ["p0", "p1", "p2"]
    cells = [rows(GOOD, bad, GOOD, GOOD), rows(GOOD, bad, bad), rows(None, None)]
    assert well_formed_responses(prompts, cells) == (["p0", "p2"], [["r0", "r2", "r3"], ["r0", "r1"]])
    # Every sample well formed (plain sampling has no annotation): the full figures stand for both.
    assert well_formed_responses(prompts[:1], [rows(GOOD, None)]) is None


@pytest.mark.integration
def test_harness_reports_format_and_binding_beside_diversity(tiny_generator, tmp_path):  # noqa: F811
    from megatron_anchor.annotation.default_annotator import annotate_text
    from megatron_anchor.eval.harness import ModelUnderTest, run_sweep
    from megatron_anchor.eval.judges import training_annotator_judge
    from megatron_anchor.inference import SamplingParams, read_prompts

    (tmp_path / "prompts.jsonl").write_text('{"id": "p0", "prompt": "Tell me about the market."}\n'
                                            '{"id": "p1", "prompt": "Write about a trip."}\n')
    prompts = read_prompts(str(tmp_path / "prompts.jsonl"))
    params = SamplingParams(max_new_tokens=12, max_annotation_tokens=12)
    models = [ModelUnderTest("anchored", tiny_generator, "anchored"), ModelUnderTest("plain", tiny_generator, "plain")]
    out = tmp_path / "samples.jsonl"
    judges = {"annotator": training_annotator_judge()}
    rows = run_sweep(models, prompts, 6, [1.0], params, judges, samples_out=str(out))
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    anchored = [s for s in samples if s["model"] == "anchored"]
    want = binding.binding([s["annotation"] for s in anchored], [annotate_text(s["response"]) for s in anchored])
    assert rows[0]["format:annotation_well_formed"] == pytest.approx(want["annotation_well_formed"])
    assert rows[0]["format:follows_annotation"] == pytest.approx(want["follows_annotation"])
    # The judge again over the well-formed samples only, prompts keeping fewer than two left out.
    kept = [[s["response"] for s in anchored if s["id"] == p.id and binding.annotation_problem(s["annotation"]) is None]
            for p in prompts]
    kept = [rs for rs in kept if len(rs) >= 2]
    entropies = [training_annotator_judge().score("", rs)["attribute_entropy"] for rs in kept]
    got = rows[0]["annotator:attribute_entropy_well_formed"]
    assert got == (pytest.approx(np.mean(entropies)) if entropies else None)
    # Plain sampling has no annotation: no format columns, and every sample counts as well formed.
    assert not any(k.startswith("format:") for k in rows[1])
    assert rows[1]["annotator:attribute_entropy_well_formed"] == rows[1]["annotator:attribute_entropy"]
