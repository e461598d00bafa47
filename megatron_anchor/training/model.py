"""Model construction: TransformerConfig from the run's config, the layer spec, GPTModel chunks and their wrappers.

What goes into the TransformerConfig beyond the architecture: the parallel layout (TP, PP, CP, virtual pipeline
chunks), precision (bf16/fp16 with megatron-core's ``Float16Module``, FP8 through Transformer Engine), activation
recomputation, and the fused kernels, each switched on where its kernel exists (:func:`resolve_fusions`).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_anchor.training.config import AnchorConfig

logger = logging.getLogger(__name__)


_TE_IMPORT: Dict[str, Optional[str]] = {}


def transformer_engine_import_error() -> Optional[str]:
    """Why ``transformer_engine.pytorch`` cannot be used here (None when it imports). Found on disk is not enough:
    a build that does not match the machine's torch or CUDA fails at import, and ``auto`` must not pick it. The
    import is tried only where CUDA is present (without a GPU the layers are never Transformer Engine's) and once
    per process."""
    if "result" not in _TE_IMPORT:
        try:
            found = importlib.util.find_spec("transformer_engine") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            _TE_IMPORT["result"] = "Transformer Engine is not installed"
        elif not torch.cuda.is_available():
            _TE_IMPORT["result"] = None  # installed; whether it imports is decided on a GPU machine
        else:
            try:
                import transformer_engine.pytorch  # noqa: F401
                _TE_IMPORT["result"] = None
            except Exception as exc:  # noqa: BLE001 - a broken build raises OSError, RuntimeError, ...
                _TE_IMPORT["result"] = f"transformer_engine.pytorch failed to import ({type(exc).__name__}: {exc})"
                logger.warning("%s: using megatron-core's local layers", _TE_IMPORT["result"])
    return _TE_IMPORT["result"]


def transformer_engine_version() -> Optional[str]:
    """The installed Transformer Engine's version (from its package metadata: no import, no GPU), or None."""
    from importlib import metadata

    for dist in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def require_transformer_engine(minimum: str) -> str:
    """The installed Transformer Engine's version; SystemExit naming both versions when it is missing or older than
    ``minimum`` (an image build's check: ``python -c "...require_transformer_engine('2.9')"``)."""
    from packaging.version import Version

    found = transformer_engine_version()
    if found is None or Version(found) < Version(minimum):
        raise SystemExit(f"Transformer Engine {found or 'is not installed'}: this image pairs megatron-core with "
                         f"Transformer Engine >= {minimum}; use a newer NGC PyTorch release (docker/train.Dockerfile)")
    return found


def has_transformer_engine() -> bool:
    """Whether Transformer Engine's layers can run here: installed and, on a GPU machine, importable."""
    return transformer_engine_import_error() is None


_EXTENSIONS: Dict[str, bool] = {}


def _has_module(name: str) -> bool:
    """Whether a CUDA extension megatron-core imports (apex's, megatron's fused softmax) can be used: found and, on a
    GPU machine, importable (megatron-core imports it, and a broken build passes a mere lookup). Once per process."""
    if name not in _EXTENSIONS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if found and torch.cuda.is_available():
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - a build for another torch/CUDA raises more than ImportError
                logger.warning("%s is installed but does not import (%s: %s): its fused kernel stays off", name,
                               type(exc).__name__, exc)
                found = False
        _EXTENSIONS[name] = found
    return _EXTENSIONS[name]


def padded_vocab_size(vocab_size: int, make_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Pad the vocabulary so each tensor-parallel shard of the embedding has the same, aligned size."""
    multiple = make_divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def vocab_rows(cfg: AnchorConfig, vocab_size: int) -> int:
    """Rows of the embedding and output layer: --padded-vocab-size when set (imported models), else the
    tokenizer's ``vocab_size`` padded by Megatron-LM's rule."""
    m = cfg.model
    if m.padded_vocab_size:
        if m.padded_vocab_size < vocab_size:
            from megatron_anchor.training.config_io import ConfigError

            # A ConfigError: preflight derives the padded vocabulary, so this is the entry point's "error:" line.
            raise ConfigError(f"--padded-vocab-size {m.padded_vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({vocab_size})")
        return m.padded_vocab_size
    return padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)


def params_dtype(cfg: AnchorConfig) -> torch.dtype:
    """The dtype the model's weights are held in (the optimizer keeps fp32 main weights beside bf16/fp16)."""
    t = cfg.training
    return torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32


FUSIONS = (
    # (TransformerConfig field, PerformanceConfig field, the flag that turns it off)
    ("bias_activation_fusion", "bias_activation_fusion", "--no-bias-activation-fusion"),
    ("bias_dropout_fusion", "bias_dropout_fusion", "--no-bias-dropout-fusion"),
    ("masked_softmax_fusion", "masked_softmax_fusion", "--no-masked-softmax-fusion"),
    ("apply_rope_fusion", "rope_fusion", "--no-rope-fusion"),
    ("cross_entropy_loss_fusion", "cross_entropy_loss_fusion", "--no-cross-entropy-loss-fusion"),
    ("gradient_accumulation_fusion", "gradient_accumulation_fusion", "--no-gradient-accumulation-fusion"),
)
"""Every fused kernel the trainer can switch on; one row per kernel, used for the config and the start-up log."""


def _fused_rope_available() -> bool:
    try:
        from megatron.core.models.common.embeddings import rope_utils
    except ImportError:
        return False
    return (getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None
            or getattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None) is not None)


def _fusion_unavailable(name: str, cfg: AnchorConfig, on_gpu: bool) -> Optional[str]:
    """Why the kernel behind ``name`` (a TransformerConfig field) cannot run here, or None when it can."""
    m = cfg.model
    te = m.transformer_impl == "transformer_engine"
    if not on_gpu:
        return "no CUDA device (megatron-core's fused kernels are CUDA-only)"
    if name == "bias_activation_fusion" and not m.swiglu and m.disable_bias_linear:
        return "the fused GeLU needs linear biases (--disable-bias-linear is set)"
    if name == "masked_softmax_fusion" and not te and not _has_module("scaled_upper_triang_masked_softmax_cuda"):
        return "the local layers need megatron's fused softmax extension (scaled_upper_triang_masked_softmax_cuda)"
    if name == "apply_rope_fusion":
        if m.position_embedding_type != "rope":
            return "no RoPE (--position-embedding-type learned_absolute)"
        if not _fused_rope_available():
            return "needs Transformer Engine >= 1.4 (its fused RoPE kernel)"
    if name == "gradient_accumulation_fusion" and not _has_module("fused_weight_gradient_mlp_cuda"):
        # Transformer Engine's own linears fuse it natively, but the output layer is megatron-core's
        # ColumnParallelLinear, whose constructor raises without apex's extension (one config flag for both).
        return "needs apex's fused_weight_gradient_mlp_cuda extension (megatron-core's output layer uses it)"
    return None


def resolve_fusions(cfg: AnchorConfig, on_gpu: Optional[bool] = None) -> Dict[str, Tuple[bool, str]]:
    """TransformerConfig fusion field -> (on, why): on where asked for and the kernel exists, else off with the
    reason (the user's flag, no CUDA, a missing extension)."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    out = {}
    for name, field, flag in FUSIONS:
        if not getattr(cfg.performance, field):
            out[name] = (False, f"turned off by {flag}")
            continue
        reason = _fusion_unavailable(name, cfg, on_gpu)
        out[name] = (reason is None, reason or "on")
    return out


_LOGGED: set = set()


def log_fusions(fusions: Dict[str, Tuple[bool, str]], print_fn: Callable[[str], None]) -> None:
    """Print which fused kernels run and why the others do not, once per process and distinct setting."""
    on = [name for name, (enabled, _) in fusions.items() if enabled]
    by_reason: Dict[str, List[str]] = {}
    for name, (enabled, why) in fusions.items():
        if not enabled:
            by_reason.setdefault(why, []).append(name)
    off = "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items())
    line = f"fused kernels on: {', '.join(on) or 'none'} | off: {off or 'none'}"
    if line not in _LOGGED:
        _LOGGED.add(line)
        print_fn(line)


def num_model_chunks(cfg: AnchorConfig) -> int:
    """Model chunks per pipeline rank: 1, or num_layers / (PP x layers per virtual stage)."""
    p = cfg.parallel
    if not p.num_layers_per_virtual_pipeline_stage:
        return 1
    return cfg.model.num_layers // (p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)


def build_transformer_config(cfg: AnchorConfig, pipeline_dtype: Optional[torch.dtype] = None,
                             fusions: Optional[Dict[str, Tuple[bool, str]]] = None, run=None):
    """megatron-core TransformerConfig for this run (architecture, parallel layout, precision, recompute,
    fusions); ``run``: the run's :class:`~megatron_anchor.training.resolved.ResolvedRun` (its boundary mode)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_anchor.training.loss import boundary_mode

    m, p, t, f = cfg.model, cfg.parallel, cfg.training, cfg.performance
    on_gpu = torch.cuda.is_available()
    dtype = params_dtype(cfg)
    fusions = fusions if fusions is not None else resolve_fusions(cfg, on_gpu)
    chunks = num_model_chunks(cfg)
    mode = run.boundary_mode if run is not None else boundary_mode(cfg.data.reset_attention_mask, m.transformer_impl)
    thd = mode == "thd"
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups if m.group_query_attention else None,
        kv_channels=m.kv_channels,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu,
        activation_func=F.silu if m.swiglu else F.gelu,
        add_bias_linear=not m.disable_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=t.bf16,
        fp16=t.fp16,
        params_dtype=dtype,
        pipeline_dtype=pipeline_dtype or dtype,
        # Loss is summed over tokens and divided by the global token count once (see loss.py), so a
        # micro-batch with few unmasked tokens (SFT) is not over-weighted.
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Pipeline stages free each output's data once sent (Megatron-LM's default): activations held per
        # in-flight micro-batch drop from a full tensor to its autograd graph. Not on CPU: gloo's overlapped
        # sends read the buffer from a background thread after the call returns, so freeing it early corrupts
        # what the next stage receives (seen with the interleaved schedule).
        deallocate_pipeline_outputs=on_gpu,
        recompute_granularity=f.recompute_granularity,
        recompute_method=f.recompute_method,
        recompute_num_layers=f.recompute_num_layers,
        persist_layer_norm=False,
        **{name: enabled for name, (enabled, _) in fusions.items()},
    )
    if chunks > 1:
        # The interleaved schedule as Megatron-LM runs it: sends and receives posted one by one and overlapped with
        # compute. Batched p2p would put a forward and a backward exchange between the same two ranks in one
        # batch, and with PP=2 the two (same shape) can be matched the wrong way round.
        kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if f.recompute_modules is not None:
        kwargs["recompute_modules"] = list(f.recompute_modules)
    if f.fp8_format:
        kwargs.update(fp8=f.fp8_format, fp8_recipe="delayed", fp8_margin=f.fp8_margin,
                      fp8_amax_history_len=f.fp8_amax_history_len, fp8_amax_compute_algo=f.fp8_amax_compute_algo)
    if p.context_parallel_size > 1:
        kwargs["cp_comm_type"] = "p2p"
        if thd and p.pipeline_model_parallel_size > 1:
            # Documents are padded to multiples of 2 x CP, so a packed micro-batch's length varies: pipeline
            # stages then exchange each activation's shape before the activation.
            kwargs["variable_seq_lengths"] = True
    return TransformerConfig(**kwargs)


def layer_spec(cfg: AnchorConfig):
    """The transformer layer spec: Transformer Engine's on GPU when installed, megatron's local one otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    qk = cfg.model.qk_layernorm
    if cfg.model.transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=cfg.model.normalization, qk_layernorm=qk)


def model_provider(cfg: AnchorConfig, vocab_size: int, pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None, config=None, run=None):
    """Build this rank's GPTModel stage (pre_process: holds the embedding; post_process: holds the output;
    ``vp_stage``: which virtual pipeline chunk, None without virtual pipeline; ``run``: the run's
    :class:`~megatron_anchor.training.resolved.ResolvedRun`, whose padded vocabulary it uses)."""
    from megatron.core.models.gpt import GPTModel

    m = cfg.model
    config = config if config is not None else build_transformer_config(cfg)
    kwargs = {"vp_stage": vp_stage} if vp_stage is not None else {}
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=run.padded_vocab_size if run is not None else vocab_rows(cfg, vocab_size),
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        rope_scaling=m.use_rope_scaling,
        rope_scaling_factor=m.rope_scaling_factor,
        **kwargs,
    )


def build_model_chunks(cfg: AnchorConfig, vocab_size: int, provider: Callable, device: torch.device,
                       config=None) -> List[torch.nn.Module]:
    """This rank's model chunks, on ``device``, in training precision, as Megatron-LM's ``get_model`` builds them.

    One chunk per rank, or one per virtual pipeline stage: chunk ``i`` of pipeline rank ``r`` holds virtual stage
    ``i * PP + r`` (megatron-core's interleaving). Only the first chunk of the first rank holds the embedding, only
    the last chunk of the last rank the output layer. With bf16/fp16 each chunk is wrapped in megatron-core's
    ``Float16Module``: weights in half precision, inputs cast on the first stage, outputs back to fp32 on the last.
    ``provider(cfg, vocab_size, pre_process, post_process, vp_stage=..., config=...)`` builds one GPTModel.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import Float16Module

    chunks = num_model_chunks(cfg)
    config = config if config is not None else build_transformer_config(cfg)
    models = []
    for i in range(chunks):
        vp = i if chunks > 1 else None
        if chunks > 1:
            # megatron-core's stage queries read the current virtual rank while a chunk is built.
            ps.set_virtual_pipeline_model_parallel_rank(i)
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp) if chunks > 1 else \
            ps.is_pipeline_first_stage()
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp) if chunks > 1 else \
            ps.is_pipeline_last_stage()
        kwargs = {"vp_stage": vp} if chunks > 1 else {}
        model = provider(cfg, vocab_size, pre_process=pre, post_process=post, config=config, **kwargs)
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        models.append(model.to(device))
    if chunks > 1:
        ps.set_virtual_pipeline_model_parallel_rank(0)
    if cfg.training.bf16 or cfg.training.fp16:
        models = [Float16Module(config, model) for model in models]
    return models


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def num_parameters(model) -> int:
    """Parameters held by this rank (one chunk, or the sum over a list of chunks)."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
