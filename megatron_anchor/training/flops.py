"""Model FLOPs of a training step and the device's peak: TFLOP/s per GPU and MFU in the log.

A step's model FLOPs are counted GEMM by GEMM (multiply-add = 2 FLOPs; forward + weight gradient + data gradient
= 3 passes), in the convention of Megatron-LM's MFU table, so our MFU reads against its figures:

- per token and layer: the QKV projection ``2 h (n_q + 2 n_kv) d`` (grouped-query attention shrinks K and V to
  ``n_kv`` heads), the output projection ``2 n_q d h``, and the MLP ``2 h f`` per matrix (3 matrices with SwiGLU,
  2 without);
- per token, once: the logits ``2 h V`` (V the padded vocabulary);
- per sequence of length L and layer: the core attention ``QK^T`` and ``softmax(QK^T) V``, ``2 L^2 n_q d`` each
  without the causal mask and half that with it (the convention counts the causal half only).

Packed sequences (``--reset-attention-mask``) attend inside each document, so the attention term is summed over
the documents' lengths (``sum L_i^2``), which the data path counts as it reads. Activation recomputation
re-runs forward passes, but model FLOPs (MFU) count the model's work once, as Megatron-LM does.
Cost: O(1) arithmetic per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TRAINING_PASSES = 3
"""Forward, backward for the data gradient, backward for the weight gradient: each GEMM runs three times."""

PEAK_BF16_TFLOPS = {
    # Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity), by device-name fragment.
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H800": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.05,
    "A10G": 70.0,
}
"""Order matters: the first fragment found in ``torch.cuda.get_device_name()`` wins (specific names first).
MFU under ``--fp8-format`` is still quoted against the bf16 peak, as Megatron-LM's table does."""

@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the count needs (resolved: no ``None`` left)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    swiglu: bool
    padded_vocab_size: int

    @classmethod
    def from_config(cls, model_cfg, padded_vocab_size: int) -> "ModelShape":
        """From a validated :class:`~megatron_anchor.training.config.ModelConfig` (defaults filled in)."""
        m = model_cfg
        heads = m.num_attention_heads
        return cls(
            num_layers=m.num_layers,
            hidden_size=m.hidden_size,
            ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
            num_attention_heads=heads,
            num_query_groups=m.num_query_groups if m.group_query_attention and m.num_query_groups else heads,
            kv_channels=m.kv_channels or m.hidden_size // heads,
            swiglu=m.swiglu,
            padded_vocab_size=padded_vocab_size,
        )


def linear_flops_per_token(shape: ModelShape) -> int:
    """Training FLOPs per token of every GEMM whose size grows with the token count (projections, MLP, logits)."""
    h, d = shape.hidden_size, shape.kv_channels
    q_width, kv_width = shape.num_attention_heads * d, shape.num_query_groups * d
    qkv = 2 * h * (q_width + 2 * kv_width)
    out_proj = 2 * q_width * h
    mlp = 2 * h * shape.ffn_hidden_size * (3 if shape.swiglu else 2)
    logits = 2 * h * shape.padded_vocab_size
    return TRAINING_PASSES * (shape.num_layers * (qkv + out_proj + mlp) + logits)


def attention_flops_per_squared_token(shape: ModelShape, causal: bool = True) -> float:
    """Training FLOPs of the core attention per unit of ``sum L_i^2`` (QK^T and the weighted sum of values)."""
    per_layer = 2 * (2 * shape.num_attention_heads * shape.kv_channels)
    return TRAINING_PASSES * shape.num_layers * per_layer * (0.5 if causal else 1.0)


def step_flops(shape: ModelShape, tokens: int, seqlen_squared_sum: int, causal: bool = True) -> float:
    """Model FLOPs of one optimizer step over ``tokens`` tokens in sequences with ``sum L_i^2 =
    seqlen_squared_sum`` (``global_batch * seq_length**2`` for unpacked batches)."""
    return (linear_flops_per_token(shape) * tokens
            + attention_flops_per_squared_token(shape, causal) * seqlen_squared_sum)


def detect_peak_tflops(device_name: Optional[str]) -> Optional[float]:
    """Dense bf16 peak TFLOP/s of a CUDA device from its name, or None when unknown (CPU, new parts)."""
    if not device_name:
        return None
    for fragment, peak in PEAK_BF16_TFLOPS.items():
        if fragment.lower() in device_name.lower():
            return peak
    return None


def device_peak_tflops(override: Optional[float]) -> Optional[float]:
    """``--peak-tflops`` when given, else the detected peak of this process's GPU (None on CPU or unknown)."""
    if override:
        return float(override)
    import torch

    if not torch.cuda.is_available():
        return None
    return detect_peak_tflops(torch.cuda.get_device_name(torch.cuda.current_device()))
