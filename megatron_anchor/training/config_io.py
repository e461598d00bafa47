"""A run's configuration as a file: :class:`ConfigError`, and YAML to and from :class:`AnchorConfig`.

The lowest layer of the trainer's configuration code (it imports the config dataclasses and no trainer module),
so the flag parser (:mod:`~megatron_anchor.training.arguments`), checkpointing and process-group set-up can all
raise :class:`ConfigError` and read or write ``run_config.yaml`` without importing one another.
Cost: reading or writing a file is linear in its size (a few kilobytes).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Dict, List, Optional

import yaml

from megatron_anchor.tokenizer import TOKENIZER_TYPES
from megatron_anchor.training.config import (
    LOSS_MASK_POLICIES,
    REPLAY_POLICIES,
    AnchorConfig,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    PerformanceConfig,
    TrainingConfig,
)


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is built or step taken."""


SECTION_CLASSES = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "performance": PerformanceConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}

CHOICES = {
    # Settings whose values come from a fixed list: the flags' ``choices``, and checked when a YAML file is read.
    "position_embedding_type": ("learned_absolute", "rope"),
    "normalization": ("LayerNorm", "RMSNorm"),
    "transformer_impl": ("auto", "local", "transformer_engine"),
    "distributed_backend": ("auto", "nccl", "gloo"),
    "lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    "loss_mask_policy": LOSS_MASK_POLICIES,
    "replay_loss_mask_policy": REPLAY_POLICIES,
    "dry_run_target": ("here", "gpu"),
    "recompute_granularity": ("full", "selective"),
    "recompute_method": ("uniform", "block"),
    "fp8_format": ("hybrid", "e4m3"),
    "fp8_amax_compute_algo": ("max", "most_recent"),
    # The data tools' list (one source of truth) plus the trainer-only NullTokenizer.
    "tokenizer_type": (*TOKENIZER_TYPES, "NullTokenizer"),
}


def base_type(annotation):
    """int for Optional[int], list for List[str], and so on."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return base_type(args[0])
    if origin in (list, List):
        return list
    return annotation


def element_type(annotation):
    """str for List[str], int for Optional[List[int]]."""
    if typing.get_origin(annotation) is typing.Union:
        annotation = [a for a in typing.get_args(annotation) if a is not type(None)][0]
    args = typing.get_args(annotation)
    return args[0] if args else str


def _flat_field_index() -> Dict[str, str]:
    """field name -> section, for flat YAML files."""
    index = {}
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            index[f.name] = section
    return index


def _numeric_from_text(value, annotation):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: numbers written as text become the field's number type,
    anything else is left for :func:`validate`'s range check to name."""
    kind = base_type(annotation)
    if kind is list:
        element = element_type(annotation)
        if isinstance(value, list) and element in (int, float):
            return [_numeric_from_text(v, element) for v in value]
        return value
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            return value
    return value


def apply_setting(cfg: AnchorConfig, section: str, name: str, value) -> None:
    """Set ``section.name`` of ``cfg`` from a file or flag value (numbers written as text become numbers)."""
    obj = getattr(cfg, section)
    if not hasattr(obj, name):
        raise ConfigError(f"unknown setting {section}.{name}")
    if name in ("data_path", "replay_data_path") and isinstance(value, str):
        value = value.split()
    setattr(obj, name, _numeric_from_text(value, typing.get_type_hints(type(obj))[name]))


def load_yaml(path: str, cfg: Optional[AnchorConfig] = None) -> AnchorConfig:
    """Apply a YAML file to ``cfg`` (a fresh default config when None). Keys may be section mappings
    (``model: {num_layers: 2}``) or flat names in field or flag spelling (``num-layers: 2``).

    An unreadable, unparsable or misshapen file is a :class:`ConfigError` naming it (and the key)."""
    cfg = cfg or AnchorConfig()
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    flat = _flat_field_index()
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: setting names must be text, got {key!r}")
        key = key.replace("-", "_")
        if key in SECTION_CLASSES and isinstance(value, dict):
            for name, v in value.items():
                if not isinstance(name, str):
                    raise ConfigError(f"{path}: setting names must be text, got {name!r} under {key}")
                apply_setting(cfg, key, name.replace("-", "_"), v)
        elif key in flat:
            apply_setting(cfg, flat[key], key, value)
        else:
            raise ConfigError(f"{path}: unknown setting '{key}'")
    for name in CHOICES:
        section = flat[name]
        value = getattr(getattr(cfg, section), name)
        if value is not None and value not in CHOICES[name]:
            raise ConfigError(f"{path}: {name} must be one of {CHOICES[name]}, got {value!r}")
    return cfg


def config_dict(cfg: AnchorConfig) -> Dict[str, dict]:
    """``cfg`` as sections of plain values, with the tokenizer and data paths made absolute."""
    out = {}
    for section in SECTION_CLASSES:
        out[section] = dataclasses.asdict(getattr(cfg, section))
    data = out["data"]
    if data.get("tokenizer_model") and os.path.exists(data["tokenizer_model"]):
        data["tokenizer_model"] = os.path.abspath(data["tokenizer_model"])
    for key in ("data_path", "replay_data_path"):
        if data.get(key):
            data[key] = [os.path.abspath(p) if os.path.exists(p + ".idx") else p for p in data[key]]
    return out


def dump_yaml(cfg: AnchorConfig, path: str) -> None:
    """Write ``cfg`` as a sectioned YAML file that :func:`load_yaml` (and ``--config``) reads back.

    Paths to the tokenizer and the data are made absolute, so the file works from any working directory.
    """
    from megatron_anchor.outputs import atomic_write

    with atomic_write(path) as fh:
        yaml.safe_dump(config_dict(cfg), fh, sort_keys=False)
