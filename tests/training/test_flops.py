"""The FLOPs formula behind TFLOP/s and MFU: equal to a hand count for two configurations, and to the FLOPs torch
itself counts in a real forward-backward of megatron-core's GPTModel (local layers, CPU)."""

from __future__ import annotations

import pytest

from megatron_anchor.training.flops import ModelShape, detect_peak_tflops, step_flops
from tests.distributed import run_distributed


def _hand_count(layers, h, heads, groups, d, ffn, swiglu, vocab, batch, seq):
    """Every GEMM of a training step written out: (rows, inner, cols) -> 2 * rows * inner * cols FLOPs, three
    passes (forward, data gradient, weight gradient)."""
    tokens = batch * seq
    gemms = []
    for _ in range(layers):
        gemms += [
            (tokens, h, heads * d),   # Q projection
            (tokens, h, groups * d),  # K projection (grouped-query: one per group)
            (tokens, h, groups * d),  # V projection
            (tokens, heads * d, h),   # attention output projection
            (tokens, h, ffn),         # MLP up
            (tokens, ffn, h),         # MLP down
        ]
        if swiglu:
            gemms.append((tokens, h, ffn))  # SwiGLU gate
        for _ in range(batch * heads):
            # Causal attention: only the lower triangle is counted, s*s/2 score entries per head.
            gemms.append((seq, d, seq / 2))  # Q K^T
            gemms.append((seq, seq / 2, d))  # softmax(Q K^T) V
    gemms.append((tokens, h, vocab))  # logits
    return 3 * sum(2 * a * b * c for a, b, c in gemms)


@pytest.mark.parametrize("cfg", [
    # GPT-2 medium style: full multi-head attention, GeLU MLP of 4h, 50k vocabulary.
    dict(layers=24, h=1024, heads=16, groups=16, d=64, ffn=4096, swiglu=False, vocab=50304, batch=8, seq=1024),
    # The 1B recipe: GQA 16/8, SwiGLU 5632, 32k vocabulary, sequence 4096.
    dict(layers=22, h=2048, heads=16, groups=8, d=128, ffn=5632, swiglu=True, vocab=32000, batch=2, seq=4096),
])
def test_formula_equals_hand_count(cfg):
    shape = ModelShape(cfg["layers"], cfg["h"], cfg["ffn"], cfg["heads"], cfg["groups"], cfg["d"], cfg["swiglu"],
                       cfg["vocab"])
    tokens = cfg["batch"] * cfg["seq"]
    assert step_flops(shape, tokens, cfg["batch"] * cfg["seq"] ** 2) == pytest.approx(_hand_count(**cfg), rel=1e-12)


def test_packed_documents_count_attention_per_document():
    shape = ModelShape(2, 64, 256, 4, 4, 16, False, 128)
    whole = step_flops(shape, 100, 100 ** 2)
    packed = step_flops(shape, 100, 60 ** 2 + 40 ** 2)  # the same 100 tokens as two documents
    per_square = (whole - packed) / (100 ** 2 - 60 ** 2 - 40 ** 2)
    assert per_square == pytest.approx(3 * 2 * 2 * 2 * 4 * 16 / 2)


def test_peak_detection_by_device_name():
    assert detect_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert detect_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert detect_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert detect_peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert detect_peak_tflops("Some Future Accelerator") is None and detect_peak_tflops(None) is None


def _measured_flops(rank, world, configs):
    """torch's FlopCounterMode over one forward-backward of a real GPTModel vs the formula (causal=False: the
    local attention computes the full score matrix and masks it), per (swiglu, query groups) configuration."""
    return {config: _count(*config) for config in configs}


def _count(swiglu, groups):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_anchor.training import initialize
    from megatron_anchor.training.arguments import parse_args, validate
    from megatron_anchor.training.model import model_provider, padded_vocab_size

    argv = ["--mock-data", "--vocab-size", "200", "--num-layers", "3", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "24", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--disable-bias-linear"]
    if swiglu:
        argv.append("--swiglu")
    if groups:
        argv += ["--group-query-attention", "--num-query-groups", str(groups)]
    cfg = parse_args(argv)
    validate(cfg, 1, False, False)
    initialize.initialize_distributed(cfg)
    initialize.set_seeds(3)
    model = model_provider(cfg, 200)
    b, s = 3, 24
    tokens = torch.randint(0, 200, (b, s))
    positions = torch.arange(s).expand(b, s)
    with FlopCounterMode(display=False) as counter:
        loss = model(tokens, positions, None, labels=tokens).sum()
        loss.backward()
    shape = ModelShape.from_config(cfg.model, padded_vocab_size(200, cfg.model.make_vocab_size_divisible_by, 1))
    return counter.get_total_flops(), step_flops(shape, b * s, b * s * s, causal=False)


CONFIGS = [(False, 0), (True, 2)]  # GeLU with full multi-head attention; SwiGLU with 2 query groups


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measured_flops, 1, args=(CONFIGS,))[0]


@pytest.mark.integration
@pytest.mark.parametrize("config", CONFIGS)
def test_formula_equals_flops_torch_counts_in_gptmodel(measured, config):
    counted, formula = measured[config]
    assert counted == formula
