"""Command line and YAML -> :class:`AnchorConfig`, and the checks that reject impossible runs early.

Flags are generated from the config dataclasses: field ``foo_bar`` is ``--foo-bar`` and its docstring is the
help text, so the dataclasses stay the single source of names and defaults. Precedence: dataclass defaults,
then ``--config FILE.yaml``, then flags given on the command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import inspect
import textwrap
import typing
from typing import Dict, List, Optional, Sequence

import yaml

from megatron_anchor.tokenizer import TOKENIZER_TYPES
from megatron_anchor.training.config import (
    LOSS_MASK_POLICIES,
    SECTIONS,
    REPLAY_POLICIES,
    SFT_POLICIES,
    AnchorConfig,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
)

_SECTION_CLASSES = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}

_CHOICES = {
    "position_embedding_type": ("learned_absolute", "rope"),
    "normalization": ("LayerNorm", "RMSNorm"),
    "transformer_impl": ("auto", "local", "transformer_engine"),
    "distributed_backend": ("auto", "nccl", "gloo"),
    "lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    "loss_mask_policy": LOSS_MASK_POLICIES,
    "replay_loss_mask_policy": REPLAY_POLICIES,
    "dry_run_target": ("here", "gpu"),
    # The data tools' list (one source of truth) plus the trainer-only NullTokenizer.
    "tokenizer_type": (*TOKENIZER_TYPES, "NullTokenizer"),
}


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any model is built or step taken."""


def field_docs(cls) -> Dict[str, str]:
    """Map each field of a dataclass to the docstring written under it (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(annotation):
    """int for Optional[int], list for List[str], and so on."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, List):
        return list
    return annotation


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every config field plus ``--config``. Defaults are suppressed so that only
    flags actually given on the command line override the YAML file."""
    parser = argparse.ArgumentParser(
        description="Annotation-anchored GPT training on megatron-core.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of settings (sectioned or flat, flag or field names).")
    for section in SECTIONS:
        cls = _SECTION_CLASSES[section]
        group = parser.add_argument_group(section, cls.__doc__)
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _base_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
            dest = f"{section}.{f.name}"
            flag = "--" + f.name.replace("_", "-")
            if kind is bool:
                if default:
                    group.add_argument("--no-" + f.name.replace("_", "-"), dest=dest, action="store_false",
                                       help=f"Turn off: {help_text}")
                else:
                    group.add_argument(flag, dest=dest, action="store_true", help=help_text)
            elif kind is list:
                group.add_argument(flag, dest=dest, nargs="+", help=help_text)
            else:
                group.add_argument(flag, dest=dest, type=kind, choices=_CHOICES.get(f.name),
                                   help=f"{help_text} (default: {default})")
    return parser


def _flat_field_index() -> Dict[str, str]:
    """field name -> section, for flat YAML files."""
    index = {}
    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            index[f.name] = section
    return index


def _apply(cfg: AnchorConfig, section: str, name: str, value) -> None:
    obj = getattr(cfg, section)
    if not hasattr(obj, name):
        raise ConfigError(f"unknown setting {section}.{name}")
    if name in ("data_path", "replay_data_path") and isinstance(value, str):
        value = value.split()
    setattr(obj, name, value)


def load_yaml(path: str, cfg: Optional[AnchorConfig] = None) -> AnchorConfig:
    """Apply a YAML file to ``cfg`` (a fresh default config when None). Keys may be section mappings
    (``model: {num_layers: 2}``) or flat names in field or flag spelling (``num-layers: 2``)."""
    cfg = cfg or AnchorConfig()
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    flat = _flat_field_index()
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key in _SECTION_CLASSES and isinstance(value, dict):
            for name, v in value.items():
                _apply(cfg, key, name.replace("-", "_"), v)
        elif key in flat:
            _apply(cfg, flat[key], key, value)
        else:
            raise ConfigError(f"{path}: unknown setting '{key}'")
    for name in _CHOICES:
        section = flat[name]
        value = getattr(getattr(cfg, section), name)
        if value is not None and value not in _CHOICES[name]:
            raise ConfigError(f"{path}: {name} must be one of {_CHOICES[name]}, got {value!r}")
    return cfg


def config_dict(cfg: AnchorConfig) -> Dict[str, dict]:
    """``cfg`` as sections of plain values, with the tokenizer and data paths made absolute."""
    out = {}
    for section in _SECTION_CLASSES:
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
    out = config_dict(cfg)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(out, fh, sort_keys=False)
    os.replace(tmp, path)


def parse_args(argv: Optional[Sequence[str]] = None) -> AnchorConfig:
    """Build the run's config from defaults, an optional YAML file and the command line."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    given = vars(ns)
    cfg = load_yaml(given.pop("config")) if given.get("config") else AnchorConfig()
    given.pop("config", None)
    for dest, value in given.items():
        section, name = dest.split(".", 1)
        _apply(cfg, section, name, value)
    return cfg


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
    weights = [float(w) for w in data_path[0::2]]
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


def validate(cfg: AnchorConfig, world_size: int, has_cuda: bool, has_te: bool) -> None:
    """Raise :class:`ConfigError` for any setting that cannot run on ``world_size`` processes.

    Fills in derived defaults (global batch size, ffn size, ...) in place. Called before distributed
    initialisation, so every rank fails the same way before any model is built or step is taken.
    """
    m, p, t, d, c, lg = cfg.model, cfg.parallel, cfg.training, cfg.data, cfg.checkpoint, cfg.logging
    errors = []
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        errors.append("tensor and pipeline parallel sizes must be >= 1")
        tp, pp = max(tp, 1), max(pp, 1)
    if world_size % (tp * pp):
        errors.append(f"world size {world_size} is not divisible by TP ({tp}) x PP ({pp}) = {tp * pp}")
    dp = max(world_size // (tp * pp), 1)

    if m.num_attention_heads % tp:
        errors.append(f"--num-attention-heads ({m.num_attention_heads}) is not divisible by TP ({tp})")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        errors.append(f"--hidden-size ({m.hidden_size}) is not divisible by --num-attention-heads "
                      f"({m.num_attention_heads}); set --kv-channels")
    if m.group_query_attention:
        g = m.num_query_groups
        if not g:
            errors.append("--group-query-attention needs --num-query-groups")
        else:
            if m.num_attention_heads % g:
                errors.append(f"--num-attention-heads ({m.num_attention_heads}) is not divisible by "
                              f"--num-query-groups ({g})")
            if g % tp:
                errors.append(f"--num-query-groups ({g}) is not divisible by TP ({tp})")
    elif m.num_query_groups not in (None, m.num_attention_heads):
        errors.append("--num-query-groups needs --group-query-attention")
    if m.num_layers % pp:
        errors.append(f"--num-layers ({m.num_layers}) is not divisible by PP ({pp})")
    if m.num_layers < pp:
        errors.append(f"--num-layers ({m.num_layers}) is smaller than PP ({pp})")
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < m.seq_length:
        errors.append(f"--max-position-embeddings ({m.max_position_embeddings}) < --seq-length ({m.seq_length})")
    if m.ffn_hidden_size is None:
        if m.swiglu:
            # 8/3 h keeps the SwiGLU MLP's parameter count equal to a 4h GeLU MLP; round for kernels.
            m.ffn_hidden_size = ((int(8 * m.hidden_size / 3) + 63) // 64) * 64
        else:
            m.ffn_hidden_size = 4 * m.hidden_size
    if m.ffn_hidden_size % tp:
        errors.append(f"--ffn-hidden-size ({m.ffn_hidden_size}) is not divisible by TP ({tp})")

    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.micro_batch_size < 1:
        errors.append("--micro-batch-size must be >= 1")
    elif t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(f"--global-batch-size ({t.global_batch_size}) is not divisible by --micro-batch-size "
                      f"({t.micro_batch_size}) x data-parallel size ({dp})")
    if t.train_iters < 1:
        errors.append("--train-iters must be >= 1")
    if t.lr_decay_iters is None:
        t.lr_decay_iters = t.train_iters
    if t.lr_warmup_iters >= t.lr_decay_iters:
        errors.append(f"--lr-warmup-iters ({t.lr_warmup_iters}) must be below the decay steps "
                      f"({t.lr_decay_iters})")
    if t.lr_decay_style == "WSD" and t.lr_wsd_decay_iters is None:
        t.lr_wsd_decay_iters = max(t.lr_decay_iters // 10, 1)
    if t.min_lr > t.lr:
        errors.append(f"--min-lr ({t.min_lr}) exceeds --lr ({t.lr})")

    backend = p.distributed_backend
    if backend == "auto":
        p.distributed_backend = backend = "nccl" if has_cuda else "gloo"
    if backend == "nccl" and not has_cuda:
        errors.append("--distributed-backend nccl needs CUDA; use gloo on CPU")
    if m.transformer_impl == "auto":
        m.transformer_impl = "transformer_engine" if (has_te and has_cuda) else "local"
    if m.transformer_impl == "transformer_engine" and not (has_te and has_cuda):
        errors.append("--transformer-impl transformer_engine needs Transformer Engine and a GPU")
    if p.sequence_parallel:
        if tp == 1:
            errors.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if m.transformer_impl != "transformer_engine":
            errors.append("--sequence-parallel needs the Transformer Engine layers (the local spec's torch "
                          "norms do not support it)")
    if p.use_distributed_optimizer and backend != "nccl":
        errors.append("--use-distributed-optimizer needs NCCL (gloo has no reduce-scatter)")
    errors.extend(_packing_errors(cfg, has_te))
    if t.exit_duration_in_mins is not None and t.exit_duration_in_mins <= 0:
        errors.append("--exit-duration-in-mins must be > 0")
    try:
        t.exit_signal = signal_name(t.exit_signal)
    except ValueError as exc:
        errors.append(str(exc))
    if t.bf16 and not has_cuda:
        # Runs, but megatron's mixed-precision optimizer asserts CUDA tensor types.
        errors.append("--bf16 needs a GPU (megatron's mixed-precision optimizer is CUDA-only)")

    if d.mock_data:
        if d.data_path:
            errors.append("--mock-data and --data-path are exclusive")
    elif not d.data_path:
        errors.append("--data-path is required (or --mock-data)")
    else:
        try:
            parse_data_path(d.data_path)
        except ConfigError as exc:
            errors.append(str(exc))
    for flag, policy, allowed in (("--loss-mask-policy", t.loss_mask_policy, LOSS_MASK_POLICIES),
                                  ("--replay-loss-mask-policy", t.replay_loss_mask_policy, REPLAY_POLICIES)):
        if policy not in allowed:  # the flags' choices catch this; configs built in code do not
            errors.append(f"{flag} {policy!r} is not one of {', '.join(allowed)}")
    if (d.mock_data or d.no_role_channel) and t.loss_mask_policy != "pretrain":
        errors.append(f"--loss-mask-policy {t.loss_mask_policy} needs the role channel "
                      "(not available with --mock-data / --no-role-channel)")
    errors.extend(_replay_errors(cfg))
    if d.tokenizer_type in (None, "NullTokenizer"):
        if not d.vocab_size:
            errors.append("set --tokenizer-type and --tokenizer-model (or --vocab-size with NullTokenizer)")
    elif not d.tokenizer_model:
        errors.append(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
    try:
        split = [float(x) for x in d.split.replace("/", ",").split(",")]
        if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
            raise ValueError
    except ValueError:
        errors.append(f"--split must be three non-negative weights like '969,30,1', got {d.split!r}")

    if c.finetune and not c.load:
        errors.append("--finetune needs --load")
    if c.save_interval is not None and c.save_interval < 1:
        errors.append("--save-interval must be >= 1")
    if c.save_interval and not c.save:
        errors.append("--save-interval needs --save")
    if lg.log_interval < 1:
        errors.append("--log-interval must be >= 1")
    if lg.eval_interval is not None and lg.eval_interval < 1:
        errors.append("--eval-interval must be >= 1")
    if lg.eval_iters < 0:
        errors.append("--eval-iters must be >= 0")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def signal_name(name: str) -> str:
    """Canonical name of a signal given as 'SIGUSR1', 'USR1' or its number; ValueError when unknown."""
    import signal

    text = str(name).strip().upper()
    try:
        return signal.Signals(int(text)).name
    except ValueError:
        pass
    if not text.startswith("SIG"):
        text = "SIG" + text
    if text not in signal.Signals.__members__:
        raise ValueError(f"--exit-signal {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    return text


# Transformer Engine releases whose fused attention takes THD (variable-length) input with padding_causal masks.
MIN_TE_VERSION_FOR_THD = "1.7.0"


def _packing_errors(cfg: AnchorConfig, has_te: bool) -> List[str]:
    """Document-boundary settings that would leak attention or do nothing on the chosen layers.

    ``--reset-attention-mask`` is honoured on both layer implementations (see
    :mod:`megatron_anchor.training.packing`); what is refused is what megatron-core would silently ignore.
    """
    m, d = cfg.model, cfg.data
    errors = []
    te = m.transformer_impl == "transformer_engine"
    rope = m.position_embedding_type == "rope"
    if d.reset_position_ids and rope and not d.reset_attention_mask:
        errors.append("--reset-position-ids does nothing with --position-embedding-type rope (megatron-core's RoPE "
                      "does not read position ids) and documents would still attend to each other: use "
                      "--reset-attention-mask, which also restarts RoPE per document on Transformer Engine")
    elif d.reset_position_ids and rope:
        errors.append("--reset-position-ids does nothing with RoPE (megatron-core's RoPE never reads position ids); "
                      "drop it: with --reset-attention-mask Transformer Engine restarts RoPE per document from the "
                      "boundaries, and on the local layers RoPE scores depend only on relative positions")
    if d.reset_attention_mask and te and has_te:
        version = _te_version()
        from packaging.version import Version

        if version is not None and Version(version) < Version(MIN_TE_VERSION_FOR_THD):
            errors.append(f"--reset-attention-mask on Transformer Engine needs THD attention, i.e. Transformer Engine "
                          f">= {MIN_TE_VERSION_FOR_THD} (found {version}); upgrade it or use --transformer-impl local")
    return errors


def _te_version():
    from importlib import metadata

    for dist in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _replay_errors(cfg: AnchorConfig) -> List[str]:
    """Why the replay settings cannot run (empty when they can, or when there is no replay)."""
    d, t = cfg.data, cfg.training
    share = d.replay_share
    if not d.replay_data_path:
        if share:
            return [f"--replay-share {share:g} needs --replay-data-path (the pretraining data to replay)"]
        return []
    errors = []
    if not 0.0 < share < 1.0:
        errors.append(f"--replay-data-path needs --replay-share between 0 and 1 (exclusive), got {share:g}")
    if t.loss_mask_policy not in SFT_POLICIES:
        errors.append(f"--replay-data-path is for fine-tuning (--loss-mask-policy {' or '.join(SFT_POLICIES)}), "
                      f"not {t.loss_mask_policy}; to mix pretraining datasets, weight them in --data-path")
    if d.mock_data or d.no_role_channel:
        errors.append("--replay-data-path needs the role channel (not available with --mock-data / "
                      "--no-role-channel)")
    if not errors:
        try:
            data_blend(cfg)
        except ConfigError as exc:
            errors.append(str(exc))
    return errors
