"""Command line and YAML -> :class:`AnchorConfig`, and the checks that reject impossible runs early.

Flags are generated from the config dataclasses: field ``foo_bar`` is ``--foo-bar``, its docstring is the
help text and its declared range (:mod:`megatron_anchor.bounds`) is checked by the flag and shown by ``--help``,
so the dataclasses stay the single source of names, defaults and ranges. Precedence: dataclass defaults, then
``--config FILE.yaml``, then flags given on the command line. YAML values get the same range checks in
:func:`validate`.
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

from megatron_anchor import bounds
from megatron_anchor.training.config import (
    ARCHITECTURE_FIELDS,
    LOSS_MASK_POLICIES,
    SECTIONS,
    REPLAY_POLICIES,
    SFT_POLICIES,
    RECOMPUTE_MODULES,
    AnchorConfig,
    ModelConfig,
)
from megatron_anchor.training.blend import Blend, data_blend, parse_data_path  # noqa: F401 - re-exported
from megatron_anchor.training.checkpoint_files import RUN_CONFIG_FILE
from megatron_anchor.training.config_io import (  # noqa: F401 - re-exported: callers import them from here
    CHOICES,
    SECTION_CLASSES,
    ConfigError,
    apply_setting,
    base_type,
    config_dict,
    dump_yaml,
    element_type,
    load_yaml,
)


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


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for every config field plus ``--config``. Defaults are suppressed so that only
    flags actually given on the command line override the YAML file."""
    parser = argparse.ArgumentParser(
        description="Annotation-anchored GPT training on megatron-core.",
        # The flag list is long: an error should end on its reason, not on a hundred lines of usage.
        usage="%(prog)s [--config FILE.yaml] [--FLAG VALUE ...]  (--help lists every flag with its range)",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of settings (sectioned or flat, flag or field names).")
    for section in SECTIONS:
        cls = SECTION_CLASSES[section]
        group = parser.add_argument_group(section, cls.__doc__)
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = base_type(hints[f.name])
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
                element = element_type(hints[f.name])
                if element in (int, float):
                    element = bounds.flag_type(element, bounds.bounds_of(cls, f.name))
                group.add_argument(flag, dest=dest, nargs="+", type=element,
                                   help=help_text + bounds.describe(cls, f.name))
            else:
                if kind in (int, float):
                    kind = bounds.flag_type(kind, bounds.bounds_of(cls, f.name))
                group.add_argument(flag, dest=dest, type=kind, choices=CHOICES.get(f.name),
                                   help=f"{help_text} (default: {default}){bounds.describe(cls, f.name)}")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> AnchorConfig:
    """Build the run's config from defaults, an optional YAML file and the command line.

    A run that loads a checkpoint (``--load``) and names no architecture setting at all takes the architecture
    from the checkpoint's ``run_config.yaml``, and its tokenizer too when none is named (an imported model needs no
    model flags). A run that names any architecture setting must name them consistently: ``--load`` then checks
    them against the checkpoint field by field.
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    given = vars(ns)
    cfg = load_yaml(given.pop("config")) if given.get("config") else AnchorConfig()
    given.pop("config", None)
    for dest, value in given.items():
        section, name = dest.split(".", 1)
        apply_setting(cfg, section, name, value)
    named = {dest.split(".", 1)[1] for dest in given if dest.startswith("model.")}
    _inherit_from_checkpoint(cfg, named)
    return cfg


INHERITED_MODEL_FIELDS = (*ARCHITECTURE_FIELDS, "max_position_embeddings")
"""What a run that names no architecture takes from the checkpoint it loads."""


def _inherit_from_checkpoint(cfg: AnchorConfig, named: set) -> None:
    load = cfg.checkpoint.load
    path = os.path.join(load, RUN_CONFIG_FILE) if load else None
    if not path or not os.path.isfile(path):
        return
    default = ModelConfig()
    if any(name in named or getattr(cfg.model, name) != getattr(default, name) for name in INHERITED_MODEL_FIELDS):
        return
    saved = load_yaml(path)
    for name in INHERITED_MODEL_FIELDS:
        setattr(cfg.model, name, getattr(saved.model, name))
    if cfg.data.tokenizer_type is None:
        for name in ("tokenizer_type", "tokenizer_model", "eod_token"):
            setattr(cfg.data, name, getattr(saved.data, name))


def validate(cfg: AnchorConfig, world_size: int, has_cuda: bool, has_te: bool) -> Optional[Blend]:
    """Raise :class:`ConfigError` for any setting that cannot run on ``world_size`` processes.

    Fills in derived defaults (global batch size, ffn size, ...) in place. Called before distributed
    initialisation, so every rank fails the same way before any model is built or step is taken. Returns the run's
    data blend, parsed here once (None with --mock-data): :func:`~megatron_anchor.training.resolved.resolve_run`
    keeps it for the rest of the run.
    """
    m, p, t, d, c, lg = cfg.model, cfg.parallel, cfg.training, cfg.data, cfg.checkpoint, cfg.logging
    # Ranges and number types first (a YAML file can hold anything): the checks below compute with the values.
    out_of_range = bounds.problems(cfg)
    if out_of_range:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(out_of_range))
    errors = []
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    if world_size % (tp * pp * cp):
        errors.append(f"world size {world_size} is not divisible by TP ({tp}) x PP ({pp}) x CP ({cp}) = "
                      f"{tp * pp * cp}")
    dp = max(world_size // (tp * pp * cp), 1)

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
    if m.padded_vocab_size is not None and (m.padded_vocab_size < 1 or m.padded_vocab_size % tp):
        errors.append(f"--padded-vocab-size ({m.padded_vocab_size}) is not a positive multiple of TP ({tp})")
    if m.use_rope_scaling and m.position_embedding_type != "rope":
        errors.append("--use-rope-scaling needs --position-embedding-type rope")
    if m.add_qkv_bias and not m.disable_bias_linear:
        errors.append("--add-qkv-bias only adds to --disable-bias-linear (without it every linear has biases)")

    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    if t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(f"--global-batch-size ({t.global_batch_size}) is not divisible by --micro-batch-size "
                      f"({t.micro_batch_size}) x data-parallel size ({dp})")
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
    if p.overlap_param_gather and not (p.use_distributed_optimizer and p.overlap_grad_reduce):
        errors.append("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    errors.extend(_packing_errors(cfg, has_te))
    errors.extend(_precision_errors(cfg, has_cuda, has_te))
    errors.extend(_recompute_errors(cfg))
    errors.extend(_virtual_pipeline_errors(cfg, dp))
    errors.extend(_context_parallel_errors(cfg))
    errors.extend(_token_multiple_errors(cfg))
    try:
        t.exit_signal = signal_name(t.exit_signal)
    except ValueError as exc:
        errors.append(str(exc))

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
    replay_errors = _replay_errors(cfg)
    errors.extend(replay_errors)
    blend = None
    if not d.mock_data and not replay_errors and (d.data_path or d.replay_data_path):
        try:
            blend = data_blend(cfg)
        except ConfigError as exc:
            if d.replay_data_path:  # without replay the --data-path error is already listed above
                errors.append(str(exc))
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
    if c.dist_ckpt_optim_fully_reshardable and not p.use_distributed_optimizer:
        errors.append("--dist-ckpt-optim-fully-reshardable applies to --use-distributed-optimizer only")
    if c.distrib_optim_fully_reshardable_mem_efficient and not c.dist_ckpt_optim_fully_reshardable:
        errors.append("--distrib-optim-fully-reshardable-mem-efficient applies to "
                      "--dist-ckpt-optim-fully-reshardable only")
    if c.save_interval and not c.save:
        errors.append("--save-interval needs --save")
    if lg.profile and not lg.profile_step_start <= lg.profile_step_end:
        errors.append(f"--profile needs 1 <= --profile-step-start ({lg.profile_step_start}) <= "
                      f"--profile-step-end ({lg.profile_step_end})")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return blend


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


def _precision_errors(cfg: AnchorConfig, has_cuda: bool, has_te: bool) -> List[str]:
    """bf16 / fp16 / FP8 settings that cannot run here. bf16 and fp16 run on CPU too (megatron-core's
    Float16Module and mixed-precision optimizer, through :mod:`megatron_anchor.cpu_compat`); FP8 needs a GPU."""
    t, f, m = cfg.training, cfg.performance, cfg.model
    errors = []
    if t.bf16 and t.fp16:
        errors.append("--bf16 and --fp16 are exclusive")
    if not t.fp16 and t.loss_scale is not None:
        errors.append("--loss-scale only applies to --fp16 (bf16 and fp32 need no loss scaling)")
    if t.fp16 and t.initial_loss_scale < t.min_loss_scale:
        errors.append("--fp16 needs --min-loss-scale <= --initial-loss-scale")
    if f.fp8_format:
        if m.transformer_impl != "transformer_engine" or not (has_te and has_cuda):
            errors.append(f"--fp8-format {f.fp8_format} needs the Transformer Engine layers on a GPU "
                          "(--transformer-impl transformer_engine)")
        if not (t.bf16 or t.fp16):
            errors.append("--fp8-format runs inside a bf16 or fp16 model: add --bf16")
        errors.extend(_fp8_shape_errors(cfg))
        capability = _cuda_capability()
        if capability is not None and capability < (8, 9):
            errors.append(f"--fp8-format needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, "
                          f"Blackwell); this GPU has {capability[0]}.{capability[1]}")
    return errors


def _fp8_shape_errors(cfg: AnchorConfig) -> List[str]:
    """Transformer Engine's FP8 GEMMs check every operand on this rank (``assert_dim_for_fp8_exec``): the inner
    dimension a multiple of 16, the outer one of 8. The weights' per-rank shapes follow TP's splits (token counts:
    :func:`_token_multiple_errors`)."""
    m, p = cfg.model, cfg.parallel
    tp = max(p.tensor_model_parallel_size, 1)
    heads = m.num_attention_heads
    kv = m.kv_channels or (m.hidden_size // heads if heads else 0)
    groups = m.num_query_groups if m.group_query_attention and m.num_query_groups else heads
    ffn = m.ffn_hidden_size or 0
    shapes = [("--hidden-size (the input of the QKV and first MLP projections)", m.hidden_size, 16),
              ("--ffn-hidden-size / TP (the input of the second MLP projection)", ffn // tp, 16),
              ("heads x kv-channels / TP (the input of the attention output projection)", heads * kv // tp, 16),
              ("(heads + 2 x query groups) x kv-channels / TP (the QKV projection's output)",
               (heads + 2 * groups) * kv // tp, 8)]
    return [f"--fp8-format needs {what} = {value} to be a multiple of {multiple} (Transformer Engine's FP8 GEMMs)"
            for what, value, multiple in shapes if value % multiple]


def _cuda_capability():
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def _layers_per_chunk(cfg: AnchorConfig) -> int:
    """Transformer layers in each model chunk (per pipeline stage, or per virtual stage)."""
    p = cfg.parallel
    if p.num_layers_per_virtual_pipeline_stage:
        return p.num_layers_per_virtual_pipeline_stage
    return max(cfg.model.num_layers // max(p.pipeline_model_parallel_size, 1), 1)


def _recompute_errors(cfg: AnchorConfig) -> List[str]:
    """Activation recomputation flags as megatron-core's TransformerConfig would take them, checked up front."""
    f = cfg.performance
    g, method, n, modules = f.recompute_granularity, f.recompute_method, f.recompute_num_layers, f.recompute_modules
    if g is None:
        given = [flag for flag, v in (("--recompute-method", method), ("--recompute-num-layers", n),
                                      ("--recompute-modules", modules)) if v is not None]
        return [f"{', '.join(given)} needs --recompute-granularity full or selective"] if given else []
    errors = []
    per_chunk = _layers_per_chunk(cfg)
    if g == "full":
        if method is None or n is None:
            errors.append("--recompute-granularity full needs --recompute-method (uniform or block) and "
                          "--recompute-num-layers")
        elif not 1 <= n <= per_chunk:
            errors.append(f"--recompute-num-layers ({n}) must be between 1 and the layers per pipeline stage "
                          f"or virtual stage ({per_chunk})")
        elif method == "uniform" and per_chunk % n:
            errors.append(f"--recompute-method uniform checkpoints groups of --recompute-num-layers ({n}) "
                          f"layers: it must divide the layers per stage ({per_chunk})")
        if modules is not None:
            errors.append("--recompute-modules applies to --recompute-granularity selective only")
    else:
        if method is not None or n is not None:
            errors.append("--recompute-granularity selective takes no --recompute-method or "
                          "--recompute-num-layers (it recomputes the --recompute-modules of every layer)")
        unknown = sorted(set(modules or ()) - set(RECOMPUTE_MODULES))
        if unknown:
            errors.append(f"--recompute-modules {unknown} unknown; choose from {list(RECOMPUTE_MODULES)}")
    return errors


def _virtual_pipeline_errors(cfg: AnchorConfig, dp: int) -> List[str]:
    """Layouts megatron-core's interleaved schedule refuses (or would run with pipeline bubbles)."""
    p, m, t = cfg.parallel, cfg.model, cfg.training
    v = p.num_layers_per_virtual_pipeline_stage
    if v is None:
        return []
    pp = max(p.pipeline_model_parallel_size, 1)
    errors = []
    if pp < 2:
        errors.append("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
    if v < 1 or m.num_layers % (pp * v):
        errors.append(f"--num-layers ({m.num_layers}) must be divisible by PP ({pp}) x "
                      f"--num-layers-per-virtual-pipeline-stage ({v})")
    elif m.num_layers // (pp * v) < 2:
        errors.append(f"--num-layers-per-virtual-pipeline-stage {v} leaves one model chunk per pipeline stage "
                      "(no interleaving): drop it or lower it")
    if t.global_batch_size and t.micro_batch_size > 0:
        micro = t.global_batch_size // (t.micro_batch_size * dp)
        if micro % pp:
            errors.append(f"the interleaved schedule runs micro-batches in groups of PP ({pp}): the "
                          f"{micro} micro-batches per step (--global-batch-size / (--micro-batch-size x DP)) must "
                          "be a multiple of it")
    return errors


def _token_multiple_errors(cfg: AnchorConfig) -> List[str]:
    """Sequence parallelism splits each rank's tokens over TP and FP8 GEMMs need them in multiples of 16: refuse
    lengths that would fail there mid-run. Packed documents under context parallelism are padded to fit instead
    (:func:`~megatron_anchor.training.packing.pad_documents`)."""
    from megatron_anchor.training.loss import boundary_mode

    m, p, t, f = cfg.model, cfg.parallel, cfg.training, cfg.performance
    tp, cp = max(p.tensor_model_parallel_size, 1), max(p.context_parallel_size, 1)
    thd = boundary_mode(cfg.data.reset_attention_mask, m.transformer_impl) == "thd"
    if cp > 1 and thd:
        return []
    errors = []
    if p.sequence_parallel and tp > 1:
        # THD flattens the micro-batch into one sequence, which is what sequence parallelism then splits.
        split, unit = (t.micro_batch_size * m.seq_length, "micro-batch") if thd else (m.seq_length // cp, "sequence")
        if split % tp:
            errors.append(f"--sequence-parallel splits each {unit}'s {split} tokens per context-parallel rank over TP "
                          f"({tp}): make them a multiple of {tp}")
    tokens = t.micro_batch_size * m.seq_length // cp // (tp if p.sequence_parallel else 1)
    if f.fp8_format and tokens % 8:
        errors.append(f"--fp8-format: Transformer Engine's FP8 GEMMs need each rank's tokens per micro-batch "
                      f"({tokens} = --micro-batch-size x --seq-length / CP{' / TP' if p.sequence_parallel else ''}) "
                      "to be a multiple of 8")
    return errors


def _context_parallel_errors(cfg: AnchorConfig) -> List[str]:
    """Context parallelism runs in Transformer Engine's attention and splits sequences into 2 x CP chunks."""
    cp, m = cfg.parallel.context_parallel_size, cfg.model
    if cp <= 1:
        return []
    errors = []
    if m.transformer_impl != "transformer_engine":
        errors.append("--context-parallel-size > 1 needs the Transformer Engine layers (megatron-core's local "
                      "attention has no context parallelism)")
    if m.seq_length % (2 * cp):
        errors.append(f"--seq-length ({m.seq_length}) must be divisible by 2 x --context-parallel-size "
                      f"({2 * cp}): each rank holds two load-balanced chunks of every sequence")
    return errors


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
        from megatron_anchor.training.model import transformer_engine_version

        version = transformer_engine_version()
        from packaging.version import Version

        if version is not None and Version(version) < Version(MIN_TE_VERSION_FOR_THD):
            errors.append(f"--reset-attention-mask on Transformer Engine needs THD attention, i.e. Transformer Engine "
                          f">= {MIN_TE_VERSION_FOR_THD} (found {version}); upgrade it or use --transformer-impl local")
    return errors


def _replay_errors(cfg: AnchorConfig) -> List[str]:
    """Why the replay settings cannot run (empty when they can, or when there is no replay); the blend's own
    parse errors are :func:`validate`'s, which parses it once."""
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
    return errors
