"""Diversity and quality metrics over the N responses a model gave to one prompt.

Definitions (N responses r_1..r_N of one prompt):

- **Semantic entropy** (bits): tags are extracted from each response by an annotator (the embedded default
  annotator, or the LLM annotator as a judge). For each attribute (tag key) seen in any response, the values across
  the N responses form a distribution (a response without that key counts as the value ``<none>``); its Shannon
  entropy H_k = -sum_v p(v) log2 p(v). The score is the mean of H_k over attributes. Identical responses give 0;
  N responses with pairwise different values on every attribute give the maximum log2(N).
- **Mean pairwise cosine distance**: with unit sentence embeddings e_i, the mean of 1 - cos(e_i, e_j) over the
  N(N-1)/2 pairs i < j. 0 for identical responses; 1 for mutually orthogonal embeddings (unrelated texts; the
  maximum for non-negative similarity, 2 only for opposite vectors).
- **Distinct count** (NoveltyBench-style): responses are partitioned greedily into equivalence classes in order: a
  response joins the first class whose first member it is similar to (similarity >= threshold), else it starts a
  new class. The score is the number of classes: 1 for identical responses, N for mutually dissimilar ones.
  ``distinct_fraction`` = classes / N.
Quality judges, NoveltyBench's utility and the judges that wrap these metrics are in
:mod:`megatron_anchor.eval.judges`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.annotation.tag_entropy import key_entropy

Tags = Sequence[Tuple[str, str]]


def semantic_entropy(tag_sets: Sequence[Tags], keys: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Entropy per attribute across responses and its mean (``score``); see the module docstring.

    ``keys`` restricts the attributes (default: every key that occurs). A response with the same key twice
    contributes its first value.
    """
    dicts = []
    for tags in tag_sets:
        d: Dict[str, str] = {}
        for k, v in tags:
            d.setdefault(k, v)
        dicts.append(d)
    if keys is None:
        keys = sorted({k for d in dicts for k in d})
    per_key = {k: key_entropy([d.get(k) for d in dicts]) for k in keys}
    score = float(np.mean(list(per_key.values()))) if per_key else 0.0
    return {"score": score, "per_attribute": per_key, "max": math.log2(len(tag_sets)) if tag_sets else 0.0}


def _unit(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


def mean_pairwise_cosine_distance(embeddings: np.ndarray) -> float:
    """Mean of 1 - cos over all pairs i < j of the rows of ``embeddings`` [N, dim] (0 when N < 2)."""
    e = _unit(embeddings)
    n = e.shape[0]
    if n < 2:
        return 0.0
    sim = e @ e.T  # [N, N]
    upper = sim[np.triu_indices(n, k=1)]
    return float(np.mean(1.0 - upper))


def greedy_partition(items: Sequence, similar: Callable[[int, int], bool]) -> List[List[int]]:
    """Partition indices 0..N-1 greedily: each joins the first class whose first member it is ``similar`` to."""
    classes: List[List[int]] = []
    for i in range(len(items)):
        for cls in classes:
            if similar(cls[0], i):
                cls.append(i)
                break
        else:
            classes.append([i])
    return classes


def distinct_count(embeddings: Optional[np.ndarray] = None, threshold: float = 0.9,
                   texts: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Equivalence classes under cosine similarity >= ``threshold`` of embeddings (or exact text match when only
    ``texts`` is given). Returns ``count``, ``fraction`` and the ``classes`` (lists of indices)."""
    if embeddings is not None:
        e = _unit(embeddings)
        sim = e @ e.T
        classes = greedy_partition(range(e.shape[0]), lambda a, b: sim[a, b] >= threshold)
        n = e.shape[0]
    elif texts is not None:
        norm = [" ".join(t.lower().split()) for t in texts]
        classes = greedy_partition(norm, lambda a, b: norm[a] == norm[b])
        n = len(norm)
    else:
        raise ValueError("distinct_count needs embeddings or texts")
    return {"count": len(classes), "fraction": len(classes) / n if n else 0.0, "classes": classes}


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points not dominated when both coordinates are to be maximised, sorted by the first."""
    idx = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in idx:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])
