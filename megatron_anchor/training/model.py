"""Model construction: TransformerConfig from :class:`ModelConfig`, the layer spec, and GPTModel."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_anchor.training.config import AnchorConfig


def has_transformer_engine() -> bool:
    """Whether Transformer Engine's PyTorch package can be found (not imported: that needs CUDA)."""
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def padded_vocab_size(vocab_size: int, make_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Pad the vocabulary so each tensor-parallel shard of the embedding has the same, aligned size."""
    multiple = make_divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def build_transformer_config(cfg: AnchorConfig, pipeline_dtype: Optional[torch.dtype] = None):
    """megatron-core TransformerConfig for this run (architecture + parallel layout + precision)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p, t = cfg.model, cfg.parallel, cfg.training
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if t.bf16 else torch.float32
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
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        bf16=t.bf16,
        params_dtype=dtype,
        pipeline_dtype=pipeline_dtype or dtype,
        # Loss is summed over tokens and divided by the global token count once (see loss.py), so a
        # micro-batch with few unmasked tokens (SFT) is not over-weighted.
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # Fused kernels need CUDA (bias+activation is a jit kernel that runs on GPU only).
        # (the GeLU variant of the fused kernel needs a bias; SwiGLU's works without).
        bias_activation_fusion=on_gpu and (m.swiglu or not m.disable_bias_linear),
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    return TransformerConfig(**kwargs)


def layer_spec(cfg: AnchorConfig):
    """The transformer layer spec: Transformer Engine's on GPU when installed, megatron's local one otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if cfg.model.transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=cfg.model.normalization)


def model_provider(cfg: AnchorConfig, vocab_size: int, pre_process: bool = True, post_process: bool = True):
    """Build this rank's GPTModel stage (pre_process: holds the embedding; post_process: holds the output)."""
    from megatron.core.models.gpt import GPTModel

    m = cfg.model
    config = build_transformer_config(cfg)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by,
                                     cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        position_embedding_type=m.position_embedding_type,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
    )


def num_parameters(model) -> int:
    """Parameters held by this rank."""
    return sum(p.numel() for p in model.parameters())
