"""One table between megatron-core's GPTModel tensors and the Hugging Face Llama-family names, read both ways.

Export and the in-house decoder read it megatron -> Hugging Face (:func:`megatron_to_hf`); ``tools/import_hf.py``
reads it Hugging Face -> megatron (:func:`hf_to_megatron`), one megatron tensor at a time. Three kinds of rule:

- ``copy``: the same tensor under another name (norms, ``o_proj``/``linear_proj``, ``down_proj``/``linear_fc2``).
- ``qkv``: megatron fuses q, k and v into ``linear_qkv``, interleaved per query group:
  ``[groups, (heads_per_group q | 1 k | 1 v), head_dim, ...]``; Hugging Face keeps three projections.
- ``glu``: megatron's SwiGLU ``linear_fc1`` is ``[gate; up]`` (act(first half) * second half); Hugging Face keeps
  ``gate_proj`` and ``up_proj``.

Names are those of TP=1, PP=1 state dicts (global layer numbers; megatron-core's dist_checkpointing reassembles any
saved split into them). On the megatron side each rule lists its local-spec name first, then the Transformer Engine
spelling (TE fuses a norm into the next linear layer as ``layer_norm_weight``), read when the first is absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class Rule:
    """One megatron tensor and the Hugging Face tensor(s) it is made of."""

    megatron: Tuple[str, ...]
    """The megatron name, then other spellings of it (Transformer Engine's) accepted when reading."""
    hf: Tuple[str, ...]
    """One name for ``copy``; q, k, v for ``qkv``; gate, up for ``glu``."""
    kind: str = "copy"


def rules(spec) -> List[Rule]:
    """Every tensor of a decoder with ``spec`` (a :class:`~megatron_anchor.inference.model.ModelSpec`)."""
    out = [Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",))]
    if spec.position_embedding == "learned_absolute":
        out.append(Rule(("embedding.position_embeddings.weight",), ("model.embed_positions.weight",)))
    norm_params = ("weight", "bias") if spec.norm == "LayerNorm" else ("weight",)
    for i in range(spec.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for p in norm_params:
            out.append(Rule((m + f"input_layernorm.{p}", m + f"self_attention.linear_qkv.layer_norm_{p}"),
                            (h + f"input_layernorm.{p}",)))
            out.append(Rule((m + f"pre_mlp_layernorm.{p}", m + f"mlp.linear_fc1.layer_norm_{p}"),
                            (h + f"post_attention_layernorm.{p}",)))
        qkv_params = ("weight", "bias") if spec.bias or spec.qkv_bias else ("weight",)
        for p in qkv_params:
            out.append(Rule((m + f"self_attention.linear_qkv.{p}",),
                            tuple(h + f"self_attn.{x}_proj.{p}" for x in "qkv"), "qkv"))
        if spec.qk_norm:
            for x in "qk":
                out.append(Rule((m + f"self_attention.{x}_layernorm.weight",), (h + f"self_attn.{x}_norm.weight",)))
        for p in ("weight", "bias") if spec.bias else ("weight",):
            out.append(Rule((m + f"self_attention.linear_proj.{p}",), (h + f"self_attn.o_proj.{p}",)))
            if spec.swiglu:
                out.append(Rule((m + f"mlp.linear_fc1.{p}",), (h + f"mlp.gate_proj.{p}", h + f"mlp.up_proj.{p}"),
                                "glu"))
            else:
                out.append(Rule((m + f"mlp.linear_fc1.{p}",), (h + f"mlp.up_proj.{p}",)))
            out.append(Rule((m + f"mlp.linear_fc2.{p}",), (h + f"mlp.down_proj.{p}",)))
    for p in norm_params:
        out.append(Rule((f"decoder.final_layernorm.{p}",), (f"model.norm.{p}",)))
    if not spec.tied_embeddings:
        out.append(Rule(("output_layer.weight",), ("lm_head.weight",)))
    return out


def split_qkv(qkv: torch.Tensor, spec) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused, per-group interleaved QKV -> (q, k, v)."""
    groups, per_group, d = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
    x = qkv.reshape(groups, per_group + 2, d, *qkv.shape[1:])
    rest = x.shape[3:]
    return (x[:, :per_group].reshape(groups * per_group * d, *rest), x[:, per_group].reshape(groups * d, *rest),
            x[:, per_group + 1].reshape(groups * d, *rest))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec) -> torch.Tensor:
    """(q, k, v) -> megatron's fused QKV: per query group its heads' q rows, then its k rows, then its v rows."""
    groups, per_group, d = spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, spec.head_dim
    rest = q.shape[1:]
    parts = (q.reshape(groups, per_group, d, *rest), k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(groups * (per_group + 2) * d, *rest)


def _pick(state: Dict[str, torch.Tensor], names: Tuple[str, ...]) -> Optional[torch.Tensor]:
    return next((state[n] for n in names if n in state), None)


def megatron_to_hf(state: Dict[str, torch.Tensor], spec) -> Dict[str, torch.Tensor]:
    """A full megatron GPTModel state dict (local or Transformer Engine names) -> Hugging Face Llama-family names,
    with ``lm_head.weight`` always present (the embedding when tied). Raises KeyError naming a missing tensor."""
    out: Dict[str, torch.Tensor] = {}
    for rule in rules(spec):
        t = _pick(state, rule.megatron)
        if t is None:
            raise KeyError(f"megatron tensor {rule.megatron[0]} missing")
        if rule.kind == "qkv":
            for name, part in zip(rule.hf, split_qkv(t, spec)):
                out[name] = part
        elif rule.kind == "glu":
            out[rule.hf[0]], out[rule.hf[1]] = torch.chunk(t, 2, dim=0)
        else:
            out[rule.hf[0]] = t
    if spec.tied_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_megatron(get: Callable[[str], torch.Tensor], spec) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(megatron name, tensor)`` for every tensor of ``spec``, each built from ``get(hf_name)`` when its turn
    comes: a caller that copies each into place and drops it holds one fused tensor (and its parts) at a time."""
    for rule in rules(spec):
        parts = [get(n) for n in rule.hf]
        if rule.kind == "qkv":
            yield rule.megatron[0], fuse_qkv(*parts, spec)
        elif rule.kind == "glu":
            yield rule.megatron[0], torch.cat(parts, dim=0)
        else:
            yield rule.megatron[0], parts[0]


def hf_names(spec) -> List[str]:
    """The Hugging Face tensor names a folder of ``spec`` must hold (a tied output layer is not among them)."""
    return [n for rule in rules(spec) for n in rule.hf]
