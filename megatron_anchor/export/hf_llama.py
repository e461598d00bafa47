"""Hugging Face Llama layout for Llama-shaped runs (RoPE, RMSNorm, SwiGLU): ``LlamaForCausalLM``.

The decoder's parameter names are Llama's (:class:`megatron_anchor.inference.model.DecoderLM`), so its state dict
is the checkpoint: fused QKV split per query group, SwiGLU halves split, vocabulary kept at its padded size.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron_anchor.inference.model import ModelSpec, spec_dict


def llama_problems(spec: ModelSpec) -> List[str]:
    """What keeps this architecture from being a Hugging Face Llama (empty when it is one): the flags needed."""
    out = []
    if spec.position_embedding != "rope":
        out.append("--position-embedding-type rope (Llama has no learned absolute positions)")
    if spec.norm != "RMSNorm":
        out.append("--normalization RMSNorm")
    if not spec.swiglu:
        out.append("--swiglu (Llama's MLP is gated SiLU)")
    if spec.rotary_percent != 1.0:
        out.append("--rotary-percent 1.0")
    return out


def llama_config(spec: ModelSpec, eos_token_id: int, extra: Optional[Dict] = None) -> Dict:
    """The transformers ``LlamaConfig`` fields for ``spec`` (float32, no bos token)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_scaling": None,
        "attention_bias": spec.bias,
        "mlp_bias": spec.bias,
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
