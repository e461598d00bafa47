"""Evaluation: diversity judges (NoveltyBench partitions, LLM attribute entropy, embedding distance), quality
judges, ability through lm-evaluation-harness, the sweep harness and the quickstart report."""

from megatron_anchor.annotation.tag_entropy import shannon_entropy
from megatron_anchor.eval.judges import (
    AttributeJudge,
    CallableQuality,
    DiversityJudge,
    EmbeddingDistanceJudge,
    PartitionJudge,
    QualityJudge,
    ReferenceLikelihood,
    calibrate_threshold,
    cumulative_utility,
)
from megatron_anchor.eval.metrics import (
    distinct_count,
    greedy_partition,
    mean_pairwise_cosine_distance,
    pareto_front,
    semantic_entropy,
)

__all__ = ["AttributeJudge", "CallableQuality", "DiversityJudge", "EmbeddingDistanceJudge", "PartitionJudge",
           "QualityJudge", "ReferenceLikelihood", "calibrate_threshold", "cumulative_utility", "distinct_count",
           "greedy_partition", "mean_pairwise_cosine_distance", "pareto_front", "semantic_entropy",
           "shannon_entropy"]
