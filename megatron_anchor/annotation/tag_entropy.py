"""Tag entropy: how spread one key's values are over a set of chunks or responses, in bits.

The one definition that both the distilled annotator's report (:mod:`megatron_anchor.annotation.distilled.evaluate`)
and the diversity metrics (:func:`megatron_anchor.eval.metrics.semantic_entropy`) use: values are compared
stripped and lower-cased, and a chunk without the key counts as the value :data:`NONE_VALUE`. Time and memory
grow linearly with the number of values.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

NONE_VALUE = "<none>"
"""The value an absent key counts as."""


def shannon_entropy(values: Sequence[str]) -> float:
    """Plug-in Shannon entropy in bits of the empirical distribution of ``values``."""
    if not values:
        return 0.0
    n = len(values)
    h = -sum((c / n) * math.log2(c / n) for c in Counter(values).values())
    return max(h, 0.0)  # (-0.0 for a single value)


def key_entropy(values: Sequence[Optional[str]]) -> float:
    """Tag entropy (bits) of one key's values over chunks (None: the key is absent from that chunk)."""
    return shannon_entropy([NONE_VALUE if v is None else v.strip().lower() for v in values])
