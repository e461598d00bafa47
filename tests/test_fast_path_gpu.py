"""The fast path where it only runs on a GPU: bf16 through Float16Module, fp16 loss scaling, FP8, the fused
kernels, the distributed optimizer with overlapped gradient reduce and parameter gather, recomputation with
Transformer Engine, context parallelism's THD partition, TFLOP/s/MFU/peak memory and CUDA profiler traces.

Every test carries the ``gpu`` marker (the conftest skips them without CUDA); those needing two GPUs skip on one.
They train a small model with Transformer Engine on the session's real token + role dataset, with document
boundaries (THD packing) on, through ``torchrun`` (NCCL), and compare losses between configurations.
"""

from __future__ import annotations

import glob
import json
import os
import re

import pytest

from tests.distributed import run_distributed, run_torchrun

pytestmark = pytest.mark.gpu

LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \| lm loss: (\S+) .*?\| tokens/s: (\S+) \| TFLOP/s/GPU: (\S+) \|"
                  r"(?: MFU: (\S+)% \|)? peak memory: (\S+) GiB")
ALL_FUSIONS = ("bias_activation_fusion, bias_dropout_fusion, masked_softmax_fusion, apply_rope_fusion, "
               "cross_entropy_loss_fusion, gradient_accumulation_fusion")
NO_FUSIONS = ("--no-bias-activation-fusion", "--no-bias-dropout-fusion", "--no-masked-softmax-fusion",
              "--no-rope-fusion", "--no-cross-entropy-loss-fusion", "--no-gradient-accumulation-fusion")


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _args(data, tmp, *extra, iters=6):
    return [
        "pretrain_anchor.py", "--data-path", data["prefix"], "--tokenizer-type", data["tokenizer_type"],
        "--tokenizer-model", data["tokenizer_model"], "--split", "90,10,0",
        "--data-cache-path", os.path.join(tmp, "cache"), "--transformer-impl", "transformer_engine",
        "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--group-query-attention",
        "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--reset-attention-mask", "--train-iters", str(iters), "--lr", "1e-3", "--eval-iters", "1",
        "--log-interval", "1", "--seed", "3", *extra,
    ]


def _train(data, tmp, *extra, nproc=1, iters=6):
    proc = run_torchrun(_args(data, tmp, *extra, iters=iters), nproc=nproc, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [m.groups() for m in LINE.finditer(proc.stdout)]
    assert [int(g[0]) for g in lines] == list(range(1, iters + 1)), proc.stdout[-3000:]
    return [float(g[1]) for g in lines], lines, proc.stdout


def _close(a, b, rel):
    return all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def bf16_plain(tiny_dataset, tmp_path_factory):
    """bf16, Transformer Engine, every fused kernel off, plain DDP: the reference the fast runs are held to."""
    tmp = str(tmp_path_factory.mktemp("gpu_plain"))
    return _train(tiny_dataset, tmp, "--bf16", *NO_FUSIONS)


def test_bf16_fused_distributed_optimizer_overlapped_matches_plain_run(bf16_plain, tiny_dataset, tmp_path):
    tmp = str(tmp_path)
    prof = os.path.join(tmp, "profile")
    losses, lines, out = _train(tiny_dataset, tmp, "--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
                                "--overlap-param-gather", "--profile", "--profile-step-start", "3",
                                "--profile-step-end", "3", "--profile-dir", prof)
    assert f"fused kernels on: {ALL_FUSIONS} | off: none" in out
    assert ", bf16, " in out  # Float16Module: bf16 weights, fp32 main weights in the optimizer
    assert _close(losses, bf16_plain[0], 2e-2), (losses, bf16_plain[0])
    assert losses[-1] < losses[0]
    for _, _, tokens, tflops, mfu, peak in lines:
        assert float(tokens) > 0 and float(tflops) > 0 and float(peak) > 0
        assert mfu is not None and 0 < float(mfu) < 100  # the peak of this GPU was detected
    traces = glob.glob(os.path.join(prof, "rank0.*.pt.trace.json"))
    assert traces
    with open(traces[0], encoding="utf-8") as fh:
        events = json.load(fh)["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)  # CUDA kernels, not only host ops


def test_fp16_with_dynamic_loss_scaling_trains(tiny_dataset, tmp_path):
    proc = run_torchrun(_args(tiny_dataset, str(tmp_path), "--fp16", "--initial-loss-scale", "65536"), nproc=1,
                        timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    scales = [float(s) for s in re.findall(r"loss scale: (\S+)", proc.stdout)]
    losses = [float(m.group(2)) for m in LINE.finditer(proc.stdout)]
    assert scales and all(s >= 1 for s in scales) and all(x == x for x in losses)


def test_fp8_hybrid_trains_like_bf16(bf16_plain, tiny_dataset, tmp_path):
    import torch

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    losses, _, out = _train(tiny_dataset, str(tmp_path), "--bf16", "--fp8-format", "hybrid")
    assert "bf16 + fp8 hybrid" in out
    assert _close(losses, bf16_plain[0], 5e-2), (losses, bf16_plain[0])


def _recompute_grads(rank, world, flags):
    import torch

    from megatron_anchor.training import initialize
    from megatron_anchor.training.arguments import parse_args, validate
    from megatron_anchor.training.model import model_provider

    cfg = parse_args(["--mock-data", "--vocab-size", "128", "--num-layers", "4", "--hidden-size", "64",
                      "--num-attention-heads", "4", "--seq-length", "64", "--transformer-impl", "transformer_engine",
                      "--position-embedding-type", "rope", "--swiglu", "--normalization", "RMSNorm",
                      "--hidden-dropout", "0.1", "--attention-dropout", "0",
                      # A bare GPTModel has no DDP gradient buffer for the fused accumulation to write into.
                      "--no-gradient-accumulation-fusion", *flags])
    validate(cfg, 1, True, True)
    initialize.initialize_distributed(cfg)
    initialize.set_seeds(7)
    model = model_provider(cfg, 128).cuda()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 64), generator=gen).cuda()
    positions = torch.arange(64, device="cuda").expand(2, 64)
    initialize.set_seeds(7)  # the same dropout draws in every run: recomputation must replay them
    model(tokens, positions, None, labels=tokens).float().sum().backward()
    return [p.grad.float().cpu() for p in model.parameters()]


def test_recomputation_with_transformer_engine_gives_the_same_gradients():
    base = run_distributed(_recompute_grads, 1, args=([],))[0]
    for flags in (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
                  ["--recompute-granularity", "selective"]):
        grads = run_distributed(_recompute_grads, 1, args=(flags,))[0]
        scale = max(g.abs().max().item() for g in base)
        assert max((a - b).abs().max().item() for a, b in zip(base, grads)) <= 1e-4 * scale, flags


def test_context_parallel_partition_is_transformer_engines():
    import torch

    tex = pytest.importorskip("transformer_engine_torch")
    from megatron_anchor.training.packing import pad_documents, thd_partition_indices

    cu = torch.tensor([0, 5, 17, 32, 33, 40, 64], dtype=torch.int32)
    for cp in (2, 4):
        cu_padded, _ = pad_documents(cu, 2, 32, cp)
        total = int(cu_padded[-1])
        for rank in range(cp):
            theirs = tex.thd_get_partitioned_indices(cu_padded.cuda(), total, cp, rank).cpu().long()
            assert torch.equal(theirs, thd_partition_indices(cu_padded, cp, rank)), (cp, rank)


@pytest.mark.skipif(_cuda_devices() < 2, reason="needs 2 GPUs")
def test_context_parallel_on_two_gpus_matches_one(bf16_plain, tiny_dataset, tmp_path):
    losses, _, _ = _train(tiny_dataset, str(tmp_path), "--bf16", *NO_FUSIONS, "--context-parallel-size", "2",
                          nproc=2)
    assert _close(losses, bf16_plain[0], 2e-2), (losses, bf16_plain[0])


@pytest.mark.skipif(_cuda_devices() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_reader_broadcast_over_nccl_matches_one_gpu(bf16_plain, tiny_dataset, tmp_path):
    losses, _, _ = _train(tiny_dataset, str(tmp_path), "--bf16", *NO_FUSIONS, "--tensor-model-parallel-size", "2",
                          "--sequence-parallel", nproc=2)
    assert _close(losses, bf16_plain[0], 2e-2), (losses, bf16_plain[0])
