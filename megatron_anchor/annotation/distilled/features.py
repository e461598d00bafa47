"""Chunk features for the distilled annotator: hashed word n-grams plus a length signal.

Why hashed n-grams and not sentence embeddings: the distilled annotator exists to be cheap, and must tag
~2,000 chunks per second per CPU core. Hashing turns a chunk into a sparse vector of word unigram and bigram
counts (punctuation kept as tokens: ``!``, ``?``, quotes and braces say a lot about tone and genre) in tens of
microseconds, with no vocabulary to store and the same result in every process (MurmurHash3, not Python's
salted ``hash``).
all-MiniLM-L6-v2 embeddings carry more meaning, but ran at 7-62 chunks per CPU-second on one core
(benchmarks/README.md), two orders of magnitude short.

Counts are damped (``log1p``) and each row scaled to unit length, so long and short chunks weigh alike; a
separate one-hot of the chunk's log length (in quarter octaves) keeps the length itself as a signal. Cost: linear
in the text; memory: the sparse matrix, ~2 x (words) non-zeros per chunk.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence

import numpy as np

from megatron_anchor.bounds import bounded

TOKEN_PATTERN = r"(?u)\b\w+\b|[^\w\s]"
"""Words, and every punctuation mark as a token of its own."""


@dataclass(frozen=True)
class FeatureConfig:
    """How chunks become feature vectors. Stored in the model file: a model reads texts the way it was trained."""

    hash_bits: int = bounded(18, ge=1, le=30)
    """Hashed n-gram space of ``2 ** hash_bits`` columns (collisions are rare below ~100k distinct n-grams)."""
    ngram_max: int = bounded(2, ge=1)
    """Word n-grams from 1 to this length."""
    length_buckets: int = bounded(40, ge=1)
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


_TOKEN_RE = re.compile(TOKEN_PATTERN)
_BIGRAM_MULT = np.uint64(0x9E3779B1)  # odd 32-bit multiplier: mixes the first word's hash before adding the second
_CACHE_LIMIT = 1 << 20


class Featurizer:
    """Texts -> a ``scipy.sparse.csr_matrix`` of shape ``[len(texts), config.n_features]`` (float32).

    Why not scikit-learn's ``HashingVectorizer``: it builds every n-gram as a Python string before hashing, which
    held a 565-character chunk to ~1,800 chunks per CPU-second, below this annotator's target. Here each distinct
    word is hashed once (scikit-learn's MurmurHash3, cached for the most recent ~1M words) and a bigram's
    feature is computed from its two word hashes with integer arithmetic over the whole batch in NumPy.
    """

    def __init__(self, config: FeatureConfig):
        try:
            from sklearn.utils import murmurhash3_32
        except ImportError as e:
            raise ImportError("the distilled annotator needs scikit-learn: "
                              "pip install 'megatron-anchor[distill]'") from e
        if config.ngram_max not in (1, 2):
            raise ValueError(f"ngram_max must be 1 or 2, got {config.ngram_max}")
        self.config = config
        self._murmur = murmurhash3_32
        self._cache: Dict[str, int] = {}

    def _hash(self, word: str) -> int:
        h = self._cache.get(word)
        if h is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()  # bounded memory on a corpus with an unbounded vocabulary
            h = self._cache[word] = self._murmur(word, positive=True)
        return h

    def __call__(self, texts: Sequence[str]):
        import scipy.sparse as sp

        cfg = self.config
        mask = np.uint64((1 << cfg.hash_bits) - 1)
        hashes: List[int] = []
        row_of: List[int] = []
        words = np.empty(len(texts), dtype=np.float64)
        get = self._cache.get
        for r, text in enumerate(texts):
            toks = _TOKEN_RE.findall(text.lower())
            hashes.extend([get(w) or self._hash(w) for w in toks])
            row_of.extend([r] * len(toks))
            words[r] = len(text.split())
        h = np.asarray(hashes, dtype=np.uint64)  # [T] word hashes of the whole batch
        rows = np.asarray(row_of, dtype=np.int64)  # [T] their rows
        cols = [h & mask]
        rws = [rows]
        if cfg.ngram_max == 2 and len(h) > 1:
            same = rows[1:] == rows[:-1]  # bigrams never straddle two texts
            big = (h[:-1][same] * _BIGRAM_MULT + h[1:][same] + np.uint64(1)) & mask
            cols.append(big)
            rws.append(rows[1:][same])
        col = np.concatenate(cols).astype(np.int64)
        row = np.concatenate(rws)
        n_hash = 1 << cfg.hash_bits
        x = sp.csr_matrix((np.ones(len(col), dtype=np.float32), (row, col)), shape=(len(texts), n_hash))
        x.sum_duplicates()  # [B, 2**bits] counts
        np.log1p(x.data, out=x.data)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())  # [B]
        norms[norms == 0] = 1.0
        x = sp.diags((1.0 / norms).astype(np.float32)) @ x
        buckets = np.minimum(cfg.length_buckets - 1, (4 * np.log2(1 + words)).astype(np.int64))
        lengths = sp.csr_matrix((np.ones(len(texts), dtype=np.float32), (np.arange(len(texts)), buckets)),
                                shape=(len(texts), cfg.length_buckets))
        return sp.hstack([x, lengths], format="csr", dtype=np.float32)
