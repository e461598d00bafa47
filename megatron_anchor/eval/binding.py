"""Format and binding of anchored samples, reported beside every diversity number.

A diversity number alone can flatter a model whose outputs are broken: annotations that never close or do not
parse, responses that ignore the annotation the model sampled. For the N samples of a prompt:

- **well formed**: the sampled annotation closed by itself (the sampler did not have to force the closing
  delimiter) and its text is exactly the one serialisation (``megatron_anchor/annotation/format.py``) of the tags
  it parses to, with at least one tag and every tag valid. Samples without an annotation (plain sampling) have
  nothing to break and count as well formed.
- **follows its annotation**: the tags a judge extracts from the *response* agree with the sampled annotation on
  every key in ``keys`` (default ``topic``) that the annotation names (values compared case-insensitively; an
  annotation naming none of them counts as not followed). A sample whose annotation is not well formed does not
  follow it. The share is over all annotated samples.
- **diversity over well-formed samples**: every judge's measures on the well-formed samples of each prompt only
  (a prompt with fewer than two is left out of the mean): :func:`megatron_anchor.eval.harness.judge_rows`, with
  :func:`well_formed_mask` here.

Time and memory are linear in the number of samples (one pass).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple


from megatron_anchor.annotation.format import ANN_CLOSE, ANN_OPEN, parse_annotation, serialize_annotation, tag_problem

FOLLOW_KEYS = ("topic",)
"""Attributes a response must share with its sampled annotation to follow it."""

Tags = Sequence[Tuple[str, str]]


def annotation_problem(annotation: Optional[dict]) -> Optional[str]:
    """Why a sampled annotation (a sampler row's ``annotation``) is not well formed; None when it is, or when
    there is none (plain sampling)."""
    if annotation is None:
        return None
    if not annotation.get("closed", False):
        return "did not close (the closing delimiter was forced at the length cap)"
    text = annotation.get("text")
    tags = parse_annotation(text) if text is not None else [tuple(t) for t in annotation.get("tags", [])]
    if not tags:
        return "no key:value tag"
    for key, value in tags:
        problem = tag_problem(key, value)
        if problem:
            return problem
    canonical = serialize_annotation(tags)[len(ANN_OPEN): -len(ANN_CLOSE)]
    if text is not None and text != canonical:
        return f"text {text!r} is not the serialisation of its tags ({canonical!r})"
    return None


def follows_annotation(annotation: Optional[dict], response_tags: Tags, keys: Sequence[str] = FOLLOW_KEYS) -> bool:
    """Whether the response's extracted tags agree with its well-formed sampled annotation on ``keys``."""
    if annotation is None or annotation_problem(annotation) is not None:
        return False
    sampled = {k: v.strip().lower() for k, v in reversed([tuple(t) for t in annotation.get("tags", [])])}
    extracted = {k: v.strip().lower() for k, v in reversed([tuple(t) for t in response_tags])}
    named = [k for k in keys if k in sampled]
    return bool(named) and all(extracted.get(k) == sampled[k] for k in named)


def binding(annotations: Sequence[Optional[dict]], response_tags: Sequence[Tags],
            keys: Sequence[str] = FOLLOW_KEYS) -> Dict[str, Optional[float]]:
    """Shares over the annotated samples: ``annotation_closed`` (closed by itself), ``annotation_well_formed``,
    ``follows_annotation``; all None when no sample has an annotation."""
    rows = [(a, t) for a, t in zip(annotations, response_tags) if a is not None]
    if not rows:
        return {"annotation_closed": None, "annotation_well_formed": None, "follows_annotation": None}
    n = len(rows)
    return {
        "annotation_closed": sum(bool(a.get("closed")) for a, _ in rows) / n,
        "annotation_well_formed": sum(annotation_problem(a) is None for a, _ in rows) / n,
        "follows_annotation": sum(follows_annotation(a, t, keys) for a, t in rows) / n,
    }


def well_formed_mask(annotations: Sequence[Optional[dict]]) -> List[bool]:
    """True for each sample that is well formed (see the module docstring)."""
    return [annotation_problem(a) is None for a in annotations]


def embedding_follows(annotations: Sequence[Optional[dict]], responses: Sequence[str], embed) -> Optional[float]:
    """Binding judged by a sentence-embedding model instead of an annotator (one prompt's samples): for each sample
    with a well-formed annotation, the share of the prompt's *other* well-formed annotations that its response is
    less similar to (cosine of embeddings) than to its own annotation's tag values; ties count half. 0.5 is chance
    (the response carries nothing of its annotation), 1.0 means every response is closest to the annotation it was
    written after. None when fewer than two samples are well formed. Time: O(N) embeddings, O(N^2) similarities."""
    import numpy as np

    kept = [(a, r) for a, r in zip(annotations, responses) if a is not None and annotation_problem(a) is None]
    if len(kept) < 2:
        return None
    values = [" ".join(v for _, v in (tuple(t) for t in a.get("tags", []))) for a, _ in kept]
    ann = np.asarray(embed(values), dtype=np.float64)
    res = np.asarray(embed([r for _, r in kept]), dtype=np.float64)
    ann /= np.maximum(np.linalg.norm(ann, axis=1, keepdims=True), 1e-12)
    res /= np.maximum(np.linalg.norm(res, axis=1, keepdims=True), 1e-12)
    sim = res @ ann.T  # [N responses, N annotations]
    own = np.diag(sim)[:, None]
    n = len(kept)
    wins = (own > sim).sum(1) + 0.5 * ((own == sim).sum(1) - 1)  # the diagonal ties with itself: not counted
    return float(np.mean(wins / (n - 1)))
