"""Hugging Face GPT-2 layout for GPT-2-shaped runs: learned absolute positions, LayerNorm, a GeLU MLP, biases.

transformers (``GPT2LMHeadModel``), vLLM and lm-evaluation-harness all load this layout. What has to match
megatron exactly, and how it does:

- **QKV**: GPT-2's ``c_attn`` projects to ``[q | k | v]`` (each ``hidden`` wide, heads contiguous inside each);
  megatron's fused ``linear_qkv`` interleaves per head. The decoder already split megatron's layout into q, k and v
  (:func:`megatron_anchor.inference.mapping.megatron_to_hf`), so here they are only concatenated.
- **Conv1D**: GPT-2 stores its projections as ``[in, out]`` (transposed ``nn.Linear`` weights).
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

import torch

from megatron_anchor.inference.model import DecoderLM, ModelSpec, spec_dict

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


def _bias(state: Dict[str, torch.Tensor], name: str, size: int) -> torch.Tensor:
    return state[name] if name in state else torch.zeros(size)


def gpt2_state_dict(model: DecoderLM) -> Dict[str, torch.Tensor]:
    """The decoder's weights under GPT-2's names and Conv1D layout (a tied output layer is left out)."""
    s = model.spec
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    h, f = s.hidden_size, s.ffn_hidden_size
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.wpe.weight": sd["model.embed_positions.weight"]}
    for i in range(s.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[dst + theirs + ".weight"] = sd[src + ours + ".weight"]
            out[dst + theirs + ".bias"] = sd[src + ours + ".bias"]
        a = src + "self_attn."
        out[dst + "attn.c_attn.weight"] = torch.cat([sd[a + f"{p}_proj.weight"] for p in "qkv"], dim=0).t()
        out[dst + "attn.c_attn.bias"] = torch.cat([_bias(sd, a + f"{p}_proj.bias", h) for p in "qkv"])
        out[dst + "attn.c_proj.weight"] = sd[a + "o_proj.weight"].t()
        out[dst + "attn.c_proj.bias"] = _bias(sd, a + "o_proj.bias", h)
        out[dst + "mlp.c_fc.weight"] = sd[src + "mlp.up_proj.weight"].t()
        out[dst + "mlp.c_fc.bias"] = _bias(sd, src + "mlp.up_proj.bias", f)
        out[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"].t()
        out[dst + "mlp.c_proj.bias"] = _bias(sd, src + "mlp.down_proj.bias", h)
    out["transformer.ln_f.weight"] = sd["model.norm.weight"]
    out["transformer.ln_f.bias"] = sd["model.norm.bias"]
    if not s.tied_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def decoder_state_from_gpt2(state: Dict[str, torch.Tensor], spec: ModelSpec) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`gpt2_state_dict`: GPT-2 names -> the decoder's (biases dropped when the spec has none)."""
    h = spec.hidden_size
    out = {"model.embed_tokens.weight": state["transformer.wte.weight"],
           "model.embed_positions.weight": state["transformer.wpe.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"], "model.norm.bias": state["transformer.ln_f.bias"]}
    for i in range(spec.num_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[dst + ours + ".weight"] = state[src + theirs + ".weight"]
            out[dst + ours + ".bias"] = state[src + theirs + ".bias"]
        qkv_w = state[src + "attn.c_attn.weight"].t()  # [3h, h]
        qkv_b = state[src + "attn.c_attn.bias"]
        for j, p in enumerate("qkv"):
            out[dst + f"self_attn.{p}_proj.weight"] = qkv_w[j * h:(j + 1) * h]
            if spec.bias:
                out[dst + f"self_attn.{p}_proj.bias"] = qkv_b[j * h:(j + 1) * h]
        for ours, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            out[dst + ours + ".weight"] = state[src + theirs + ".weight"].t()
            if spec.bias:
                out[dst + ours + ".bias"] = state[src + theirs + ".bias"]
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}
