"""A single-process decoder with a KV cache, holding a megatron-anchor GPT's weights under Hugging Face names.

Why our own decoder rather than megatron-core's inference engine: megatron-core 0.16's engines and dynamic
context allocate CUDA memory and graphs, and the trainer's CPU workarounds do not reach them; a 200-line decoder
is simple to check against the megatron forward (tests compare logits) and runs anywhere. Its module names are the
Llama names of ``transformers`` (``model.layers.N.self_attn.q_proj`` ...), so for a Llama-shaped run
(RoPE, RMSNorm, SwiGLU) its ``state_dict()`` *is* the exported checkpoint, and an exported folder loads back into
it unchanged. GPT-2-shaped runs (LayerNorm, learned positions, GeLU MLP, biases) run here too; their exported
folders use GPT-2's names and layout, converted back on load (:mod:`megatron_anchor.inference.gpt2_adapter`).
Memory: the weights plus a KV cache of 2 x layers x batch x kv_heads x length x head_dim floats.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron_anchor.inference.gpt2_adapter import decoder_state_from_gpt2
from megatron_anchor.inference.mapping import megatron_to_hf


@dataclass
class ModelSpec:
    """Architecture of a decoder-only GPT, as the decoder needs it."""

    vocab_size: int
    """Rows of the (padded) embedding."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    max_positions: int
    norm: str = "RMSNorm"
    """RMSNorm or LayerNorm."""
    norm_eps: float = 1e-5
    position_embedding: str = "rope"
    """rope or learned_absolute."""
    rope_base: float = 10000.0
    rotary_percent: float = 1.0
    swiglu: bool = True
    gelu_approximation: str = "none"
    """GeLU MLPs: "none" (erf, what megatron computes unfused) or "tanh" (megatron's fused bias-GeLU kernel)."""
    bias: bool = False
    """Biases on every linear layer (megatron's add_bias_linear)."""
    tied_embeddings: bool = True
    qkv_bias: bool = False
    """Biases on the query, key and value projections only (megatron's add_qkv_bias; Qwen2)."""
    qk_norm: bool = False
    """Each head's queries and keys normalised (``norm``) before RoPE (megatron's qk_layernorm; Qwen3)."""
    rope_scaling_factor: Optional[float] = None
    """Llama 3.1's RoPE frequency scaling with this factor (megatron-core's fixed low/high-frequency factors 1
    and 4 and original context 8192); None: no scaling."""

    @classmethod
    def from_anchor_config(cls, cfg, padded_vocab: int) -> "ModelSpec":
        """From the trainer's :class:`~megatron_anchor.training.config.AnchorConfig` (defaults filled)."""
        m = cfg.model
        heads = m.num_attention_heads
        return cls(
            vocab_size=padded_vocab, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=heads,
            num_kv_heads=m.num_query_groups if m.group_query_attention else heads,
            head_dim=m.kv_channels or m.hidden_size // heads, ffn_hidden_size=m.ffn_hidden_size,
            max_positions=m.max_position_embeddings or m.seq_length, norm=m.normalization,
            norm_eps=m.norm_epsilon, position_embedding=m.position_embedding_type, rope_base=float(m.rotary_base),
            rotary_percent=m.rotary_percent, swiglu=m.swiglu, bias=not m.disable_bias_linear,
            tied_embeddings=not m.untie_embeddings_and_output_weights, qkv_bias=m.add_qkv_bias,
            qk_norm=m.qk_layernorm, rope_scaling_factor=m.rope_scaling_factor if m.use_rope_scaling else None,
        )


class Norm(nn.Module):
    """RMSNorm or LayerNorm, with parameter names that both megatron and transformers use (weight, bias)."""

    def __init__(self, dim: int, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "LayerNorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "LayerNorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an external KV cache."""

    def __init__(self, s: ModelSpec):
        super().__init__()
        self.s = s
        qkv_bias = s.bias or s.qkv_bias
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=s.bias)
        if s.qk_norm:
            self.q_norm = Norm(s.head_dim, s.norm, s.norm_eps)
            self.k_norm = Norm(s.head_dim, s.norm, s.norm_eps)

    def forward(self, x, rope, cache: Optional[Tuple[torch.Tensor, torch.Tensor]], start: int,
                key_valid: Optional[torch.Tensor] = None):
        b, t, _ = x.shape
        s = self.s
        # [b, t, heads * d] -> [b, t, heads, d] (per-head q/k norms act here) -> [b, heads, t, d]
        q = self.q_proj(x).view(b, t, s.num_heads, s.head_dim)
        k = self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:b, :, start:start + t] = k
            v_cache[:b, :, start:start + t] = v
            k, v = k_cache[:b, :, :start + t], v_cache[:b, :, :start + t]
        mask = None
        if t > 1:
            # Query i (slot start + i) sees slots 0 .. start + i.
            q_slot = torch.arange(start, start + t, device=x.device)[:, None]
            k_slot = torch.arange(k.shape[2], device=x.device)[None, :]
            mask = k_slot <= q_slot  # [t, slots]
        if key_valid is not None:
            # Left padding: a row's leading slots hold no token and are never attended to.
            valid = key_valid[:, None, None, :k.shape[2]]  # [b, 1, 1, slots]
            if t > 1:
                # A padding slot's own query sees itself, so its (never read) output stays finite, not NaN.
                valid = valid | (k_slot == q_slot)
            mask = valid if mask is None else mask & valid
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=s.num_kv_heads != s.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim))


def _apply_rope(x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate the first ``rot_dim`` channels (halves layout, as megatron's default and transformers' Llama)."""
    cos, sin = rope  # [t, rot_dim], or [b, 1, t, rot_dim] when rows sit at their own positions
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float = 1.0,
                           high_freq_factor: float = 4.0, original_context: int = 8192) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: wavelengths beyond ``original_context / low_freq_factor`` are stretched by
    ``factor``, those below ``original_context / high_freq_factor`` kept, and the band between blended linearly in
    ``original_context / wavelength``. The defaults are the values megatron-core fixes."""
    wavelength = 2 * math.pi / inv_freq
    blend = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    out = torch.where(wavelength > original_context / low_freq_factor, inv_freq / factor, inv_freq)
    middle = (wavelength >= original_context / high_freq_factor) & (wavelength <= original_context / low_freq_factor)
    return torch.where(middle, blended, out)


class MLP(nn.Module):
    """SwiGLU (gate, up, down) or a GeLU MLP (up, down)."""

    def __init__(self, s: ModelSpec):
        super().__init__()
        self.swiglu = s.swiglu
        self.gelu_approximation = s.gelu_approximation
        if s.swiglu:
            self.gate_proj = nn.Linear(s.hidden_size, s.ffn_hidden_size, bias=s.bias)
        self.up_proj = nn.Linear(s.hidden_size, s.ffn_hidden_size, bias=s.bias)
        self.down_proj = nn.Linear(s.ffn_hidden_size, s.hidden_size, bias=s.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximation))


class Layer(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, s: ModelSpec):
        super().__init__()
        self.input_layernorm = Norm(s.hidden_size, s.norm, s.norm_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = Norm(s.hidden_size, s.norm, s.norm_eps)
        self.mlp = MLP(s)

    def forward(self, x, rope, cache, start, key_valid=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start, key_valid)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, s: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        if s.position_embedding == "learned_absolute":
            self.embed_positions = nn.Embedding(s.max_positions, s.hidden_size)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.num_layers))
        self.norm = Norm(s.hidden_size, s.norm, s.norm_eps)


class KVCache:
    """Preallocated keys and values per layer: [batch, kv_heads, max_len, head_dim] each."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (batch, spec.num_kv_heads, max_len, spec.head_dim)
        self.layers = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(spec.num_layers)]
        self.max_len = max_len


class DecoderLM(nn.Module):
    """The decoder: ``forward(ids, start, cache)`` -> logits [batch, tokens, vocab]."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = _Body(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tied_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_cache: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _rope(self, need: int, device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """cos and sin [positions, rot_dim] for positions 0 .. at least ``need - 1`` (cached)."""
        s = self.spec
        if s.position_embedding != "rope":
            return None
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need:
            rot = int(s.head_dim * s.rotary_percent)
            inv_freq = 1.0 / (s.rope_base ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))
            if s.rope_scaling_factor is not None:
                inv_freq = llama3_scaled_inv_freq(inv_freq, s.rope_scaling_factor)
            n = max(need, s.max_positions)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # [n, rot]
            self._rope_cache = (emb.cos(), emb.sin())
        return self._rope_cache

    def forward(self, ids: torch.Tensor, start: int = 0, cache: Optional[KVCache] = None,
                last_only: bool = False, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for ``ids`` [batch, t] in slots ``start .. start + t - 1`` (slot = position without ``pad``).

        With a ``cache``, keys/values of earlier slots are read from it and this call's are written to it.
        ``last_only`` computes the output layer for the final position only (what sampling needs).
        ``pad`` [batch]: rows are left-padded; row r's first ``pad[r]`` slots hold no token (never attended to)
        and its token in slot j sits at position ``j - pad[r]``, so a padded row computes what it would alone.
        """
        b, t = ids.shape
        x = self.model.embed_tokens(ids)
        slots = torch.arange(start, start + t, device=ids.device)
        positions = slots if pad is None else (slots[None, :] - pad[:, None]).clamp(min=0)  # [t] or [b, t]
        if self.spec.position_embedding == "learned_absolute":
            # A padded batch keeps feeding rows that already ended at the context length (their outputs are never
            # read): their positions are clamped into the table.
            table = self.spec.max_positions - 1
            x = x + self.model.embed_positions(positions if pad is None else positions.clamp(max=table))
        rope = self._rope(start + t, ids.device)
        if rope is not None:
            # [t, rot], or per row [b, 1, t, rot] (broadcast over heads)
            rope = tuple(r[positions] if pad is None else r[positions][:, None] for r in rope)
        key_valid = None
        if pad is not None:
            end = start + t
            key_valid = torch.arange(end, device=ids.device)[None, :] >= pad[:, None]  # [b, slots]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, cache.layers[i] if cache is not None else None, start, key_valid)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    # -- weights ---------------------------------------------------------------------------------------------
    @classmethod
    def from_megatron_state(cls, state: Dict[str, torch.Tensor], spec: ModelSpec) -> "DecoderLM":
        """Build from a full megatron GPTModel state dict (TP=1/PP=1 names, local or Transformer Engine spec)."""
        model = cls(spec)
        model.load_state_dict(megatron_to_hf(state, spec), strict=True)
        return model.eval()

    def hf_state_dict(self) -> Dict[str, torch.Tensor]:
        """Weights under transformers' Llama names (the tied output layer is left out, as transformers saves it)."""
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.spec.tied_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    @classmethod
    def from_hf_folder(cls, folder: str) -> "DecoderLM":
        """Load a folder written by :mod:`megatron_anchor.export` (config.json + model.safetensors), Llama or
        GPT-2 layout."""
        from safetensors.torch import load_file

        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        spec = spec_from_hf_config(config)
        model = cls(spec)
        state = load_file(os.path.join(folder, "model.safetensors"))
        if config.get("model_type") == "gpt2":
            state = decoder_state_from_gpt2(state, spec)
        if spec.tied_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True)
        return model.eval()


def spec_from_hf_config(config: dict) -> ModelSpec:
    """:class:`ModelSpec` of a ``config.json`` (ours carry the exact spec under ``megatron_anchor``; other folders
    must be Llama)."""
    if "megatron_anchor" in config:
        return ModelSpec(**config["megatron_anchor"]["spec"])
    if config.get("model_type") not in (None, "llama"):
        raise ValueError(f"config.json of model_type {config.get('model_type')!r} without a megatron_anchor spec: "
                         "only folders written by tools/export_hf.py, or Llama folders, load here")
    heads = config["num_attention_heads"]
    return ModelSpec(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        ffn_hidden_size=config["intermediate_size"], max_positions=config["max_position_embeddings"],
        norm_eps=config.get("rms_norm_eps", 1e-5), rope_base=float(config.get("rope_theta", 10000.0)),
        bias=bool(config.get("attention_bias", False)), tied_embeddings=bool(config.get("tie_word_embeddings")),
    )


def spec_dict(spec: ModelSpec) -> dict:
    """JSON-ready spec."""
    return asdict(spec)


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied output layer counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def approx_flops_per_token(spec: ModelSpec) -> float:
    """2 x parameters of the matmuls, for rough throughput reports."""
    attn = spec.hidden_size * spec.head_dim * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    mlp = spec.hidden_size * spec.ffn_hidden_size * (3 if spec.swiglu else 2)
    return 2.0 * (spec.num_layers * (attn + mlp) + spec.hidden_size * spec.vocab_size)
