"""Diversity evaluation: semantic entropy, pairwise embedding distance, distinct count, quality proxies."""

from megatron_anchor.eval.metrics import (
    distinct_count,
    greedy_partition,
    judge_score,
    mean_log_likelihood,
    mean_pairwise_cosine_distance,
    pareto_front,
    semantic_entropy,
    shannon_entropy,
)

__all__ = ["distinct_count", "greedy_partition", "judge_score", "mean_log_likelihood",
           "mean_pairwise_cosine_distance", "pareto_front", "semantic_entropy", "shannon_entropy"]
