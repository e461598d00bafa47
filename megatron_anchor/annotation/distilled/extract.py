"""The extractive head: free-text keys whose values are names copied out of the chunk (``entities``, often
``location``).

A classifier over values seen in the teacher sample cannot name a person it never saw; but the teacher mostly
*copies* such values from the text. So for a key whose teacher values are mostly spans of their own chunk, the
distilled annotator scores the chunk's candidate spans (runs of capitalised words, code identifiers) with a
logistic regression over a few surface features (how often and where the span occurs, whether it only ever
starts a sentence, its shape) plus how often the teacher picked the same string elsewhere, and writes the best
ones, comma-separated, as the teacher does. Cost per chunk: one regular-expression pass and a few dozen
multiply-adds per candidate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.annotation.tag_entropy import key_entropy

# Runs of capitalised words (joined by the small words names contain), or identifiers such as __init__ or f().
_CANDIDATE_RE = re.compile(
    r"\b[A-Z][\w'\u2019-]*(?:\s+(?:(?:of|the|de|la|le|van|von|du|da|del|and)\s+)?[A-Z][\w'\u2019-]*){0,3}"
    r"|\b\w*_\w+\b(?:\(\))?"
)
_WORD_RE = re.compile(r"\b[A-Z][\w'\u2019-]*")  # each capitalised word of a run is a candidate too
_SENTENCE_START_RE = re.compile(r"(?:^|[.!?:;]\s+|\n\s*)$")
N_FEATURES = 10


def split_items(value: str) -> List[str]:
    """The comma-separated items of a value, lower-cased (how extractive values are compared)."""
    return [p.strip().lower() for p in value.split(",") if p.strip()]


@dataclass
class Candidate:
    """A span found in a chunk: its first surface form, where it occurs, and how often."""

    text: str
    first: int
    count: int = 1
    at_sentence_start: int = 0


def candidates(text: str) -> List[Candidate]:
    """Distinct candidate spans of ``text`` (compared lower-cased), in order of first occurrence."""
    found: Dict[str, Candidate] = {}
    matches = list(_CANDIDATE_RE.finditer(text))
    spans = {m.span() for m in matches}
    matches += [m for m in _WORD_RE.finditer(text) if m.span() not in spans]
    matches.sort(key=lambda m: m.start())
    for m in matches:
        span = m.group().strip()
        key = span.lower()
        start = _SENTENCE_START_RE.search(text, max(0, m.start() - 3), m.start()) is not None or m.start() == 0
        c = found.get(key)
        if c is None:
            found[key] = c = Candidate(span, m.start(), 0, 0)
        c.count += 1
        c.at_sentence_start += start
    return list(found.values())


def _features(c: Candidate, text_len: int, prior: Optional[Tuple[float, float]]) -> List[float]:
    pos, seen = prior if prior is not None else (0.0, 0.0)
    return [
        len(c.text.split()),
        math.log1p(c.count),
        c.first / max(1, text_len),
        c.at_sentence_start / c.count,  # 1.0: only ever starts a sentence ("The", "However")
        float(c.text.isupper() and len(c.text) > 1),
        float(any(ch.isdigit() for ch in c.text)),
        float("_" in c.text or c.text.endswith("()")),
        math.log((pos + 0.5) / (seen - pos + 0.5)),  # the teacher's pick rate for this string elsewhere
        math.log1p(seen),
        math.log1p(len(c.text)),
    ]


@dataclass
class Extractor:
    """A fitted extractive head for one key."""

    coef: np.ndarray
    """[N_FEATURES] logistic-regression weights."""
    intercept: float
    threshold: float
    """Candidates scoring above this are written."""
    max_items: int
    """At most this many items per value (the teacher's 90th percentile)."""
    prior: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    """Lower-cased span -> (times the teacher picked it, times it was a candidate) in the training sample."""

    def scores(self, text: str) -> List[Tuple[float, Candidate]]:
        """Each candidate of ``text`` with its probability of being an item, best first."""
        cands = candidates(text)
        if not cands:
            return []
        x = np.array([_features(c, len(text), self.prior.get(c.text.lower())) for c in cands])  # [n, F]
        p = 1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept)))
        return sorted(zip(p.tolist(), cands), key=lambda pc: (-pc[0], pc[1].first))

    def predict(self, text: str) -> Optional[str]:
        """The value for ``text`` (items joined by ", "), or None when no candidate clears the threshold."""
        picked = [c.text for p, c in self.scores(text) if p > self.threshold][: self.max_items]
        return ", ".join(picked) if picked else None


def extractive_share(pairs: Iterable[Tuple[str, Optional[str]]]) -> float:
    """Of the teacher's items for a key, the share that are candidate spans of their own chunk."""
    found = total = 0
    for text, value in pairs:
        if value is None:
            continue
        cands = {c.text.lower() for c in candidates(text)}
        for item in split_items(value):
            total += 1
            found += item in cands
    return found / total if total else 0.0


def _training_rows(texts: Sequence[str], values: Sequence[Optional[str]],
                   prior: Dict[str, Tuple[float, float]], leave_one_out: bool) -> Tuple[np.ndarray, np.ndarray]:
    xs: List[List[float]] = []
    ys: List[int] = []
    for text, value in zip(texts, values):
        items = set(split_items(value)) if value is not None else set()
        for c in candidates(text):
            key = c.text.lower()
            y = int(key in items)
            p = prior.get(key)
            if leave_one_out and p is not None:  # the chunk's own label must not leak into its prior feature
                p = (p[0] - y, p[1] - 1)
            xs.append(_features(c, len(text), p))
            ys.append(y)
    return np.array(xs, dtype=np.float64).reshape(-1, N_FEATURES), np.array(ys, dtype=np.int64)


def fit_extractor(texts: Sequence[str], values: Sequence[Optional[str]], val_texts: Sequence[str],
                  val_values: Sequence[Optional[str]], max_prior: int = 50_000, seed: int = 0) -> Extractor:
    """Fit the head on the training chunks, then pick its threshold on the validation chunks: the best item F1
    among thresholds that keep the tag entropy within 5% of the teacher's (broad tags first), else the threshold
    with the highest entropy.

    Time and memory grow with the candidates in the sample (a few per chunk); the prior keeps the
    ``max_prior`` most frequent strings.
    """
    from sklearn.linear_model import LogisticRegression

    counts: Dict[str, List[float]] = {}
    item_counts = []
    for text, value in zip(texts, values):
        items = set(split_items(value)) if value is not None else set()
        if value is not None:
            item_counts.append(len(items))
        for c in candidates(text):
            pc = counts.setdefault(c.text.lower(), [0.0, 0.0])
            pc[0] += c.text.lower() in items
            pc[1] += 1
    top = sorted(counts.items(), key=lambda kv: -kv[1][1])[:max_prior]
    prior = {k: (v[0], v[1]) for k, v in top}
    x, y = _training_rows(texts, values, prior, leave_one_out=True)
    max_items = max(1, int(np.ceil(np.percentile(item_counts, 90)))) if item_counts else 1
    if len(set(y.tolist())) < 2:  # nothing (or everything) to learn: a head that never writes a value
        return Extractor(np.zeros(N_FEATURES), -10.0, 0.5, max_items, prior)
    lr = LogisticRegression(C=1.0, max_iter=500, random_state=seed).fit(x, y)
    ex = Extractor(lr.coef_[0].astype(np.float64), float(lr.intercept_[0]), 0.5, max_items, prior)
    target = key_entropy(val_values)
    best = (False, -1.0, 0.0, 0.5)  # (entropy kept, F1 or entropy, -threshold)
    for t in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
        ex.threshold = t
        predicted = [ex.predict(tx) for tx in val_texts]
        h = key_entropy(predicted)
        kept = h >= 0.95 * target
        best = max(best, (kept, item_f1(predicted, val_values) if kept else h, 0.0, -t))
    ex.threshold = -best[3]
    return ex


def item_f1(predicted: Sequence[Optional[str]], teacher: Sequence[Optional[str]]) -> float:
    """Micro-averaged F1 of predicted items against the teacher's, over all chunks."""
    tp = n_pred = n_true = 0
    for p, t in zip(predicted, teacher):
        ps = set(split_items(p)) if p else set()
        ts = set(split_items(t)) if t else set()
        tp += len(ps & ts)
        n_pred += len(ps)
        n_true += len(ts)
    return 2 * tp / (n_pred + n_true) if n_pred + n_true else 1.0
