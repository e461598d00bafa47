"""Hugging Face GPT-2 layout for GPT-2-shaped runs: learned absolute positions, LayerNorm, a GeLU MLP, biases.

transformers (``GPT2LMHeadModel``), vLLM and lm-evaluation-harness all load this layout. This module says whether
a run fits it and writes its ``config.json``; the weights' names and layout (fused ``c_attn``, Conv1D
transposes, biases, tied embeddings), both ways, are :mod:`megatron_anchor.inference.gpt2_adapter`'s, beside the
decoder that reads them back. What the config has to match in megatron exactly, and how it does:

- **GeLU**: megatron's unfused MLP uses ``F.gelu`` (erf): GPT-2's ``activation_function="gelu"`` in transformers
  and vLLM. Runs trained with megatron's fused bias-GeLU kernel or Transformer Engine compute the tanh
  approximation: ``gelu_new`` (``--gelu-approximation tanh`` at export).
- **Attention scale** 1/sqrt(head_dim) with ``head_dim = hidden / heads``: GPT-2 cannot express other
  ``--kv-channels`` nor grouped-query attention.
- **Biases**: GPT-2 always has them; a run trained with ``--disable-bias-linear`` exports zeros, which is exact.
- **Embeddings**: tied or untied (``tie_word_embeddings``); the vocabulary keeps its padded size.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from megatron_anchor.inference.model import ModelSpec, spec_dict

GELU_NAMES = {"none": "gelu", "tanh": "gelu_new"}
"""ModelSpec.gelu_approximation -> the activation name transformers and vLLM both know."""


def gpt2_problems(spec: ModelSpec) -> List[str]:
    """What keeps this architecture from being a Hugging Face GPT-2 (empty when it is one): the flags needed."""
    out = []
    if spec.position_embedding != "learned_absolute":
        out.append("--position-embedding-type learned_absolute")
    if spec.norm != "LayerNorm":
        out.append("--normalization LayerNorm")
    if spec.swiglu:
        out.append("no --swiglu (GPT-2's MLP is a plain GeLU MLP)")
    if spec.num_kv_heads != spec.num_heads:
        out.append("no --group-query-attention")
    if spec.head_dim * spec.num_heads != spec.hidden_size:
        out.append("no --kv-channels (GPT-2's head size is hidden / heads)")
    if spec.gelu_approximation not in GELU_NAMES:
        out.append(f"a GeLU approximation in {sorted(GELU_NAMES)}")
    return out


def gpt2_config(spec: ModelSpec, eos_token_id: int, extra: Optional[Dict] = None) -> Dict:
    """The transformers ``GPT2Config`` fields for ``spec`` (float32, dropout off, no bos token)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": spec.vocab_size,
        "n_embd": spec.hidden_size,
        "n_layer": spec.num_layers,
        "n_head": spec.num_heads,
        "n_inner": spec.ffn_hidden_size,
        "n_positions": spec.max_positions,
        "activation_function": GELU_NAMES[spec.gelu_approximation],
        "layer_norm_epsilon": spec.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": spec.tied_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "use_cache": True,
        "megatron_anchor": {"spec": spec_dict(spec), **(extra or {})},
    }
