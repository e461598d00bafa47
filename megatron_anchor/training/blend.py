"""The datasets a run reads: Megatron's ``--data-path`` form parsed, and the SFT blend with replayed pretraining data.

Parsed once per run, after validation, into :class:`~megatron_anchor.training.resolved.ResolvedRun` (the data
checks, the datasets provider and the forward step read it from there). Time and memory: linear in the number of
prefixes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

from megatron_anchor.training.config import AnchorConfig
from megatron_anchor.training.config_io import ConfigError


def parse_data_path(data_path: List[str]):
    """Split Megatron's ``--data-path`` form into (prefixes, weights or None).

    'A' or 'A B' -> equal weights (None); 'W1 A W2 B' -> weights [W1, W2]."""
    if not data_path:
        return [], None
    if len(data_path) == 1:
        return list(data_path), None
    try:
        float(data_path[0])
        weighted = True
    except ValueError:
        weighted = False
    if not weighted:
        return list(data_path), None
    if len(data_path) % 2:
        raise ConfigError(f"--data-path with weights needs 'W1 PREFIX1 W2 PREFIX2 ...', got {data_path}")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ConfigError(f"--data-path with weights needs 'W1 PREFIX1 W2 PREFIX2 ...', got {data_path}") from None
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--data-path weights must be finite, >= 0 and not all 0, got {data_path[0::2]}")
    return list(data_path[1::2]), weights


@dataclasses.dataclass(frozen=True)
class Blend:
    """The datasets a run reads, in blend order (the order megatron-core's ``BlendedDataset`` numbers them
    with ``dataset_id``): the --data-path entries, then the --replay-data-path entries."""

    prefixes: List[str]
    weights: Optional[List[float]]
    """Blend weights (None: megatron's own rule for unweighted prefixes, sizes as they are)."""
    policies: List[str]
    """Loss-mask policy of each dataset."""
    sources: List[str]
    """'sft' or 'replay' for each dataset (what the per-source loss reports group by)."""


def data_blend(cfg: AnchorConfig) -> Blend:
    """The run's blend: --data-path under --loss-mask-policy and, with a replay share, --replay-data-path
    under --replay-loss-mask-policy, weighted so replay gets exactly --replay-share of the samples."""
    d, t = cfg.data, cfg.training
    prefixes, weights = parse_data_path(d.data_path)
    policies = [t.loss_mask_policy] * len(prefixes)
    sources = ["sft"] * len(prefixes)
    if not d.replay_data_path:
        return Blend(prefixes, weights, policies, sources)
    replay, replay_weights = parse_data_path(d.replay_data_path)
    for name, p, w in (("--data-path", prefixes, weights), ("--replay-data-path", replay, replay_weights)):
        if w is None and len(p) > 1:
            # Unweighted multi-prefix blends follow dataset sizes, unknown until megatron builds the indices.
            raise ConfigError(f"with --replay-data-path, give {name} blend weights for its {len(p)} prefixes "
                              "('W1 PREFIX1 W2 PREFIX2 ...')")
    share = d.replay_share

    def scaled(w, n, total):
        w = w or [1.0] * n
        return [total * x / sum(w) for x in w]

    return Blend(prefixes + replay, scaled(weights, len(prefixes), 1.0 - share) + scaled(replay_weights,
                 len(replay), share), policies + [t.replay_loss_mask_policy] * len(replay),
                 sources + ["replay"] * len(replay))
