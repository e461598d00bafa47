"""Hugging Face layouts of the Llama family for RoPE/RMSNorm/SwiGLU runs: ``LlamaForCausalLM``, and
``Qwen2ForCausalLM`` (biases on q, k, v only) and ``Qwen3ForCausalLM`` (per-head q/k RMSNorm) for what Llama
cannot express.

The decoder's parameter names are these families' own (:class:`megatron_anchor.inference.model.DecoderLM`), so
its state dict is the checkpoint: fused QKV split per query group, SwiGLU halves split, vocabulary kept at its
padded size. Llama 3.1's RoPE scaling is written as transformers' ``llama3`` rope type with megatron-core's fixed
low/high-frequency factors and original context.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron_anchor.inference.model import ModelSpec, spec_dict

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
"""transformers' ``rope_scaling`` for ``ModelSpec.rope_scaling_factor`` (the factor is added): megatron-core's
fixed values, which :func:`megatron_anchor.inference.model.llama3_scaled_inv_freq` computes too."""


def _common_problems(spec: ModelSpec) -> List[str]:
    out = []
    if spec.position_embedding != "rope":
        out.append("--position-embedding-type rope (no learned absolute positions)")
    if spec.norm != "RMSNorm":
        out.append("--normalization RMSNorm")
    if not spec.swiglu:
        out.append("--swiglu (the MLP is gated SiLU)")
    if spec.rotary_percent != 1.0:
        out.append("--rotary-percent 1.0")
    return out


def llama_problems(spec: ModelSpec) -> List[str]:
    """What keeps this architecture from being a Hugging Face Llama (empty when it is one): the flags needed."""
    out = _common_problems(spec)
    if spec.qkv_bias and not spec.bias:
        out.append("no --add-qkv-bias (Llama's attention_bias covers every linear layer)")
    if spec.qk_norm:
        out.append("no --qk-layernorm")
    return out


def qwen2_problems(spec: ModelSpec) -> List[str]:
    """What keeps this architecture from being a Hugging Face Qwen2 (biases on q, k, v and nowhere else)."""
    out = _common_problems(spec)
    if not spec.qkv_bias or spec.bias:
        out.append("--disable-bias-linear --add-qkv-bias")
    if spec.qk_norm:
        out.append("no --qk-layernorm")
    if spec.rope_scaling_factor is not None:
        out.append("no --use-rope-scaling")
    return out


def qwen3_problems(spec: ModelSpec) -> List[str]:
    """What keeps this architecture from being a Hugging Face Qwen3 (q/k norms; no biases, or all attention
    biases with an MLP that has none: not expressible here, so no biases)."""
    out = _common_problems(spec)
    if not spec.qk_norm:
        out.append("--qk-layernorm")
    if spec.bias or spec.qkv_bias:
        out.append("--disable-bias-linear without --add-qkv-bias")
    if spec.rope_scaling_factor is not None:
        out.append("no --use-rope-scaling")
    return out


def _config(spec: ModelSpec, eos_token_id: int, extra: Optional[Dict], arch: str, model_type: str) -> Dict:
    rope_scaling = None
    if spec.rope_scaling_factor is not None:
        rope_scaling = {**LLAMA3_ROPE, "factor": spec.rope_scaling_factor}
    config = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_base,
        "rope_scaling": rope_scaling,
        "attention_dropout": 0.0,
        "tie_word_embeddings": spec.tied_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "use_cache": True,
        # The exact spec, so megatron_anchor.inference reads the folder back without guessing.
        "megatron_anchor": {"spec": spec_dict(spec), **(extra or {})},
    }
    if model_type == "llama":
        config.update(attention_bias=spec.bias, mlp_bias=spec.bias)
    elif model_type == "qwen3":
        config.update(attention_bias=False)
    if model_type != "llama":
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def llama_config(spec: ModelSpec, eos_token_id: int, extra: Optional[Dict] = None) -> Dict:
    """The transformers ``LlamaConfig`` fields for ``spec`` (float32, no bos token)."""
    return _config(spec, eos_token_id, extra, "LlamaForCausalLM", "llama")


def qwen2_config(spec: ModelSpec, eos_token_id: int, extra: Optional[Dict] = None) -> Dict:
    """The transformers ``Qwen2Config`` fields for ``spec``."""
    return _config(spec, eos_token_id, extra, "Qwen2ForCausalLM", "qwen2")


def qwen3_config(spec: ModelSpec, eos_token_id: int, extra: Optional[Dict] = None) -> Dict:
    """The transformers ``Qwen3Config`` fields for ``spec``."""
    return _config(spec, eos_token_id, extra, "Qwen3ForCausalLM", "qwen3")
