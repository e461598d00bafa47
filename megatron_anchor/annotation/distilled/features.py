"""Chunk features for the distilled annotator: hashed word n-grams plus a length signal.

Why hashed n-grams and not sentence embeddings: the distilled annotator exists to be cheap, and must tag
~2,000 chunks per second per CPU core. scikit-learn's ``HashingVectorizer`` turns a chunk into a sparse vector
of word unigram and bigram counts (punctuation kept as tokens: ``!``, ``?``, quotes and braces say a lot about
tone and genre) in tens of microseconds, with no vocabulary to store and the same result in every process.
all-MiniLM-L6-v2 embeddings carry more meaning, but run at a few hundred chunks per second on a core
(benchmarks/README.md), an order of magnitude short.

Counts are damped (``log1p``) and each row scaled to unit length, so long and short chunks weigh alike; a
separate one-hot of the chunk's log length (in quarter octaves) keeps the length itself as a signal. Cost: linear
in the text; memory: the sparse matrix, ~2 x (words) non-zeros per chunk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Sequence

import numpy as np

TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]"
"""Words, and every punctuation mark as a token of its own."""


@dataclass(frozen=True)
class FeatureConfig:
    """How chunks become feature vectors. Stored in the model file: a model reads texts the way it was trained."""

    hash_bits: int = 18
    """Hashed n-gram space of ``2 ** hash_bits`` columns (collisions are rare below ~100k distinct n-grams)."""
    ngram_max: int = 2
    """Word n-grams from 1 to this length."""
    length_buckets: int = 40
    """One-hot columns for ``4 * log2(1 + words)``, capped (bucket edges ~19% apart)."""

    @property
    def n_features(self) -> int:
        """Total columns: hashed n-grams, then the length buckets."""
        return (1 << self.hash_bits) + self.length_buckets

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "FeatureConfig":
        return cls(**{k: int(raw[k]) for k in ("hash_bits", "ngram_max", "length_buckets")})


class Featurizer:
    """Texts -> a ``scipy.sparse.csr_matrix`` of shape ``[len(texts), config.n_features]`` (float32)."""

    def __init__(self, config: FeatureConfig):
        try:
            from sklearn.feature_extraction.text import HashingVectorizer
        except ImportError as e:
            raise ImportError("the distilled annotator needs scikit-learn: "
                              "pip install 'megatron-anchor[distill]'") from e

        self.config = config
        self._hv = HashingVectorizer(
            n_features=1 << config.hash_bits, ngram_range=(1, config.ngram_max), alternate_sign=False, norm=None,
            token_pattern=TOKEN_PATTERN, lowercase=True, dtype=np.float32,
        )

    def __call__(self, texts: Sequence[str]):
        import scipy.sparse as sp

        x = self._hv.transform(texts)  # [B, 2**bits] raw counts
        np.log1p(x.data, out=x.data)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())  # [B]
        norms[norms == 0] = 1.0
        x = sp.diags((1.0 / norms).astype(np.float32)) @ x
        words = np.fromiter((len(t.split()) for t in texts), dtype=np.float64, count=len(texts))
        buckets = np.minimum(self.config.length_buckets - 1, (4 * np.log2(1 + words)).astype(np.int64))
        lengths = sp.csr_matrix((np.ones(len(texts), dtype=np.float32), (np.arange(len(texts)), buckets)),
                                shape=(len(texts), self.config.length_buckets))
        return sp.hstack([x, lengths], format="csr", dtype=np.float32)

