"""The in-house decoder's weights <-> Hugging Face GPT-2's names and layout, both directions in one place.

:meth:`~megatron_anchor.inference.model.DecoderLM.from_hf_folder` reads an exported GPT-2 folder back through
:func:`decoder_state_from_gpt2`; export (:mod:`megatron_anchor.export.hf_gpt2`, which also writes the config)
writes one through :func:`gpt2_state_dict`. The layout differences, and why they are exact:

- **QKV**: GPT-2's ``c_attn`` projects to ``[q | k | v]`` (each ``hidden`` wide, heads contiguous inside each);
  the decoder keeps q, k and v apart (megatron's per-head interleaving is undone by
  :func:`megatron_anchor.inference.mapping.megatron_to_hf`), so they are only concatenated and split here.
- **Conv1D**: GPT-2 stores its projections as ``[in, out]`` (transposed ``nn.Linear`` weights).
- **Biases**: GPT-2 always has them; a decoder without them exports zeros (exact) and drops them on the way back.
- **Embeddings**: a tied output layer is not stored; an untied one is ``lm_head.weight`` on both sides.

The functions take the spec duck-typed (as :mod:`megatron_anchor.inference.mapping` does) so that
:mod:`megatron_anchor.inference.model` can import this module without a loop. Time and memory: one pass over the
tensors; the transposes and the q/k/v concatenation copy each projection once.
"""

from __future__ import annotations

from typing import Dict

import torch


def _bias(state: Dict[str, torch.Tensor], name: str, size: int) -> torch.Tensor:
    return state[name] if name in state else torch.zeros(size)


def gpt2_state_dict(model) -> Dict[str, torch.Tensor]:
    """The weights of ``model`` (a :class:`~megatron_anchor.inference.model.DecoderLM`) under GPT-2's names and
    Conv1D layout (a tied output layer is left out)."""
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


def decoder_state_from_gpt2(state: Dict[str, torch.Tensor], spec) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`gpt2_state_dict`: GPT-2 names -> the decoder's for ``spec`` (a
    :class:`~megatron_anchor.inference.model.ModelSpec`; biases dropped when the spec has none)."""
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
