"""The trainer's fast path on CPU: data read once per tensor-parallel group, virtual pipeline stages, activation
recomputation, and the start-up checks for what runs only on a GPU.

One 4-process gloo session (TP=2 x PP=2, 4 layers, document boundaries on) shows: the TP-rank-0 broadcast gives
exactly the losses of every rank reading its own batches; a virtual pipeline (2 chunks per rank, megatron-core's
interleaved schedule) continues a plain-pipeline checkpoint with the plain pipeline's losses, and its checkpoint
loads back into the plain pipeline; full (uniform, block) and selective recomputation give the gradients of no
recomputation, with dropout on.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_anchor.training.arguments import ConfigError, parse_args, validate
from megatron_anchor.training.batch import decode_header, encode_header, pack, stage_keeps, unpack
from megatron_anchor.training.packing import (CU_SEQLENS, CU_SEQLENS_PADDED, MAX_SEQLEN, add_boundaries,
                                              pad_documents, rank_token_multiple, split_for_context_parallel,
                                              thd_partition_indices, zigzag_positions)
from tests.distributed import run_distributed

EOD = 9


def _cfg(*extra, mock=True):
    return parse_args((["--mock-data", "--vocab-size", "64"] if mock else []) + list(extra))


def _errors(cfg, world=1, cuda=False, te=False):
    with pytest.raises(ConfigError) as exc:
        validate(cfg, world, cuda, te)
    return str(exc.value)


# --- start-up checks --------------------------------------------------------------------------------------------

def test_mixed_precision_runs_on_cpu_and_fp8_is_refused_there_with_what_to_do():
    for flags in (["--bf16"], ["--fp16"], ["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
                                           "--overlap-param-gather"]):
        validate(_cfg(*flags), 2, False, False)  # megatron-core's mixed-precision path on CPU (cpu_compat)
    assert "needs the Transformer Engine layers on a GPU" in _errors(_cfg("--bf16", "--fp8-format", "hybrid"))
    assert "exclusive" in _errors(_cfg("--bf16", "--fp16"), cuda=True)
    msg = _errors(_cfg("--fp8-format", "hybrid", "--transformer-impl", "local"), cuda=True)
    assert "needs the Transformer Engine layers" in msg and "add --bf16" in msg
    assert "--loss-scale only applies to --fp16" in _errors(_cfg("--loss-scale", "1024"), cuda=True)
    validate(_cfg("--bf16", "--fp8-format", "hybrid", "--num-layers", "2", "--hidden-size", "64",
                  "--ffn-hidden-size", "256"), 1, True, True)  # what a GPU with Transformer Engine accepts


def test_recompute_flags_are_checked_like_megatron_core_does():
    assert "needs --recompute-method" in _errors(_cfg("--recompute-granularity", "full"))
    assert "between 1 and the layers per pipeline stage" in _errors(_cfg(
        "--num-layers", "4", "--recompute-granularity", "full", "--recompute-method", "block",
        "--recompute-num-layers", "3", "--pipeline-model-parallel-size", "2"), world=2)
    assert "must divide the layers per stage" in _errors(_cfg(
        "--num-layers", "4", "--recompute-granularity", "full", "--recompute-method", "uniform",
        "--recompute-num-layers", "3"))
    assert "takes no --recompute-method" in _errors(_cfg("--recompute-granularity", "selective",
                                                         "--recompute-method", "uniform"))
    assert "unknown" in _errors(_cfg("--recompute-granularity", "selective", "--recompute-modules", "moe"))
    assert "needs --recompute-granularity" in _errors(_cfg("--recompute-num-layers", "1"))
    validate(_cfg("--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp"), 1, False, False)


def test_virtual_pipeline_and_context_parallel_layouts_are_checked():
    vp = ("--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage")
    assert "needs --pipeline-model-parallel-size >= 2" in _errors(_cfg(
        "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1"))
    assert "divisible by PP (2)" in _errors(_cfg(*vp, "3"), world=2)
    assert "leaves one model chunk" in _errors(_cfg(*vp, "4"), world=2)
    assert "must be a multiple of it" in _errors(_cfg(*vp, "2", "--micro-batch-size", "1",
                                                      "--global-batch-size", "3"), world=2)
    validate(_cfg(*vp, "2", "--micro-batch-size", "1", "--global-batch-size", "4"), 2, False, False)
    assert "needs the Transformer Engine layers" in _errors(_cfg("--context-parallel-size", "2"), world=2)
    assert "divisible by 2 x --context-parallel-size" in _errors(_cfg(
        "--context-parallel-size", "4", "--seq-length", "100"), world=4, cuda=True, te=True)
    assert "not divisible by TP (1) x PP (1) x CP (2)" in _errors(_cfg("--context-parallel-size", "2"), world=3,
                                                                  cuda=True, te=True)
    assert "--overlap-param-gather needs" in _errors(_cfg("--overlap-param-gather"))


def test_fusions_are_on_where_their_kernels_exist_and_off_on_cpu_with_the_reason():
    from megatron_anchor.training.model import FUSIONS, log_fusions, resolve_fusions

    cfg = _cfg("--position-embedding-type", "rope", "--swiglu")
    validate(cfg, 1, False, False)
    cpu = resolve_fusions(cfg, on_gpu=False)
    assert set(cpu) == {name for name, _, _ in FUSIONS}
    assert all(not on and "no CUDA device" in why for on, why in cpu.values())
    lines = []
    log_fusions(cpu, lines.append)
    log_fusions(cpu, lines.append)  # logged once per process
    assert len(lines) == 1 and "fused kernels on: none" in lines[0]
    # On a GPU with the local layers, the jit kernels turn on and the extension-only ones say what they need.
    gpu = resolve_fusions(cfg, on_gpu=True)
    assert gpu["bias_dropout_fusion"] == (True, "on") and gpu["cross_entropy_loss_fusion"][0]
    assert gpu["bias_activation_fusion"][0]
    assert not gpu["gradient_accumulation_fusion"][0] and "apex" in gpu["gradient_accumulation_fusion"][1]
    off = resolve_fusions(_cfg("--no-bias-dropout-fusion"), on_gpu=True)
    assert off["bias_dropout_fusion"] == (False, "turned off by --no-bias-dropout-fusion")
    gelu = _cfg("--disable-bias-linear")
    assert "needs linear biases" in resolve_fusions(gelu, on_gpu=True)["bias_activation_fusion"][1]


# --- what each rank gets ----------------------------------------------------------------------------------------

def test_header_and_buffer_round_trip_any_keys():
    batch = {"tokens": torch.arange(12).reshape(2, 6), "loss_mask": torch.rand(2, 6),
             "roles": torch.randint(0, 6, (2, 6), dtype=torch.uint8), "dataset_id": torch.tensor([3, 1]),
             CU_SEQLENS: torch.tensor([0, 4, 6, 12], dtype=torch.int32), MAX_SEQLEN: 6, "note": None,
             "flag": True, "empty": torch.zeros(0, 3)}
    spec, buffer = pack(batch)
    got = unpack(decode_header(encode_header(spec)), buffer.clone())
    assert set(got) == set(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value
    with pytest.raises(TypeError, match="'bad'"):
        pack({"bad": [1, 2]})


def test_each_pipeline_stage_receives_only_what_it_uses():
    keys = ["tokens", "position_ids", "labels", "loss_mask", "roles", "dataset_id", CU_SEQLENS, MAX_SEQLEN,
            "sample_length", "some_future_key"]
    first, last = stage_keeps(True, False, True), stage_keeps(False, True, True)
    middle, middle_plain = stage_keeps(False, False, True), stage_keeps(False, False, False)
    assert [k for k in keys if first(k)] == ["tokens", "position_ids", CU_SEQLENS, MAX_SEQLEN, "sample_length"]
    assert [k for k in keys if last(k)] == keys[2:]  # every key the loss may use, the open set included
    assert [k for k in keys if middle(k)] == [CU_SEQLENS, MAX_SEQLEN, "sample_length"]
    assert not any(middle_plain(k) for k in keys)
    assert all(stage_keeps(True, True, False)(k) for k in keys)


def _packed_batch():
    tokens = torch.tensor([[5, EOD, 7, 8, EOD, 1, 2, 3, 4, 6, EOD, 2], [EOD, 1, 2, 3, 4, 5, 6, EOD, 1, 2, 3, 4]])
    batch = {"tokens": tokens, "labels": tokens + 100, "position_ids": torch.arange(12).expand(2, 12).clone(),
             "loss_mask": torch.ones(2, 12), "roles": torch.full((2, 12), 5, dtype=torch.uint8),
             "dataset_id": torch.tensor([0, 1])}
    return add_boundaries(batch, EOD)


def test_context_parallel_ranks_hold_every_real_token_once_in_zigzag_chunks():
    batch = _packed_batch()
    cp = 2
    cu_padded, source = pad_documents(batch[CU_SEQLENS], 2, 12, cp)
    lengths = (cu_padded[1:] - cu_padded[:-1]).tolist()
    assert all(n % (2 * cp) == 0 for n in lengths) and cu_padded[-1] % 2 == 0
    held = torch.cat([source[thd_partition_indices(cu_padded, cp, r)] for r in range(cp)])
    real = held[held >= 0]
    assert sorted(real.tolist()) == list(range(24))  # every token of the micro-batch exactly once
    # Per document, rank r holds chunks r and 2cp-1-r: each rank gets the same causal attention work.
    assert zigzag_positions(8, 2, 0).tolist() == [0, 1, 6, 7] and zigzag_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    parts = [split_for_context_parallel(batch, cp, r, "thd") for r in range(cp)]
    for part in parts:
        assert part["tokens"].shape == part["loss_mask"].shape == part["roles"].shape
        assert torch.equal(part["dataset_id"], batch["dataset_id"])  # per sample: kept whole
        assert torch.equal(part[CU_SEQLENS_PADDED], cu_padded)
        assert part[MAX_SEQLEN] == max(lengths)
    assert sum(int(p["loss_mask"].sum()) for p in parts) == 24  # padding carries no loss
    labels = torch.cat([p["labels"][p["loss_mask"] > 0] for p in parts])
    assert sorted(labels.tolist()) == sorted((batch["tokens"] + 100).reshape(-1).tolist())
    plain = [split_for_context_parallel(batch, cp, r, "none") for r in range(cp)]
    assert all(p["tokens"].shape == (2, 6) for p in plain)


def test_packed_context_parallel_pads_each_ranks_tokens_for_sequence_parallel_and_fp8():
    batch = _packed_batch()
    for cp, multiple in ((2, rank_token_multiple(4, True, False)), (2, rank_token_multiple(2, True, True))):
        cu_padded, _ = pad_documents(batch[CU_SEQLENS], 2, 12, cp, multiple)
        lengths = (cu_padded[1:] - cu_padded[:-1]).tolist()
        assert all(n % (2 * cp) == 0 for n in lengths)
        parts = [split_for_context_parallel(batch, cp, r, "thd", multiple) for r in range(cp)]
        for part in parts:
            assert part["tokens"].shape[1] % multiple == 0, (multiple, part["tokens"].shape)
        assert sum(int(p["loss_mask"].sum()) for p in parts) == 24  # the extra padding carries no loss
    assert rank_token_multiple(4, False, False) == 1 and rank_token_multiple(4, True, True) == 32
    # One 64-token sample of two documents (33 + 31) under CP=2, FP8 and sequence parallelism at TP=4: each TP
    # rank's share of each CP rank's tokens must be a multiple of 8 (an lcm of TP and 16 gave 12 here).
    two_docs = torch.tensor([0, 33, 64], dtype=torch.int32)
    cu_padded, _ = pad_documents(two_docs, 1, 64, 2, rank_token_multiple(4, True, True))
    assert (int(cu_padded[-1]) // 2 // 4) % 8 == 0


def test_sequence_parallel_and_fp8_lengths_that_would_fail_mid_run_are_refused():
    sp = _cfg("--tensor-model-parallel-size", "4", "--num-attention-heads", "4", "--sequence-parallel",
              "--transformer-impl", "transformer_engine", "--seq-length", "66")
    assert "66 tokens per context-parallel rank over TP (4): make them a multiple of 4" in _errors(sp, world=4,
                                                                                                  cuda=True, te=True)
    fp8 = _cfg("--bf16", "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine", "--seq-length", "36",
               "--micro-batch-size", "1", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256")
    assert "to be a multiple of 8" in _errors(fp8, cuda=True, te=True)
    validate(_cfg("--bf16", "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine", "--seq-length",
                  "40", "--micro-batch-size", "1", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size",
                  "256"), 1, True, True)  # 40 tokens: a multiple of 8 is enough
    weights = _cfg("--bf16", "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine", "--num-layers",
                   "2", "--hidden-size", "64", "--ffn-hidden-size", "200", "--tensor-model-parallel-size", "2")
    assert "--ffn-hidden-size / TP (the input of the second MLP projection) = 100" in _errors(weights, world=2,
                                                                                             cuda=True, te=True)
    packed = _cfg("--bf16", "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine", "--seq-length",
                  "36", "--micro-batch-size", "1", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size",
                  "256", "--context-parallel-size", "2", "--reset-attention-mask")
    validate(packed, 2, True, True)  # packed documents under CP are padded to fit instead


# --- distributed: TP=2 x PP=2 ---------------------------------------------------------------------------------

def _argv(data, tmp, *extra, iters=4, dropout=False):
    argv = [
        "--data-path", data["prefix"], "--tokenizer-type", data["tokenizer_type"],
        "--tokenizer-model", data["tokenizer_model"], "--split", "90,10,0",
        "--data-cache-path", os.path.join(tmp, "cache"),
        "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--swiglu",
        "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--train-iters", str(iters), "--lr", "3e-3", "--eval-iters", "1", "--log-interval", "1", "--seed", "5",
    ]
    if not dropout:
        argv += ["--hidden-dropout", "0", "--attention-dropout", "0"]
    return argv + list(extra)


def _setup(argv):
    import pretrain_anchor as pa
    from megatron_anchor.training.loop import setup

    return setup(parse_args(argv), pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)


def _losses(res):
    return {"train": [m["lm loss"] for m in res.train], "valid": [v["lm loss"] for v in res.valid]}


def _every_rank_reads(tr):
    """Today's path before the broadcast: each rank reads and collates its own copy of every micro-batch."""
    from megatron.core import parallel_state as ps

    import pretrain_anchor as pa
    from megatron_anchor.training.data import build_tokenizer

    train, make_valid = pa.train_valid_test_datasets_provider(
        tr.cfg, build_tokenizer(tr.cfg), tr.state.consumed_train_samples, ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(), reads=True)
    assert len(tr.model) == 1
    tr.train_iter, tr.make_valid_iter, tr.source = train, make_valid, None
    return tr


def _grads(argv):
    from tests.distributed import gradients

    tr = _setup(argv)
    batch = next(tr.train_iter)
    return [g.clone() for g in gradients(tr, batch)]


def _session(rank, world, data, tmp):
    from megatron_anchor.training.loop import run

    out = {}
    packed = ("--reset-attention-mask",)
    ck_a, ck_c = os.path.join(tmp, "ck_plain"), os.path.join(tmp, "ck_vp")
    run(_setup(_argv(data, tmp, *packed, "--save", ck_a, iters=2)))
    out["broadcast"] = _losses(run(_setup(_argv(data, tmp, *packed, "--load", ck_a))))
    out["every_rank_reads"] = _losses(run(_every_rank_reads(_setup(_argv(data, tmp, *packed, "--load", ck_a)))))
    vp = ("--num-layers-per-virtual-pipeline-stage", "1")
    tr = _setup(_argv(data, tmp, *packed, *vp, "--load", ck_a, "--save", ck_c))
    out["vp_chunks"] = len(tr.model)
    out["vp"] = _losses(run(tr))
    # The virtual-pipeline checkpoint back in the plain pipeline: at its last iteration only validation runs.
    out["vp_as_plain"] = _losses(run(_setup(_argv(data, tmp, *packed, "--load", ck_c))))

    recompute = {"none": (), "full-uniform": ("--recompute-granularity", "full", "--recompute-method", "uniform",
                                               "--recompute-num-layers", "2"),
                 "full-block": ("--recompute-granularity", "full", "--recompute-method", "block",
                                "--recompute-num-layers", "1"),
                 "selective": ("--recompute-granularity", "selective", "--recompute-modules", "core_attn", "mlp")}
    # One micro-batch (global batch 2), the same on every run; dropout on: recomputation must replay it.
    grads = {name: _grads(_argv(data, tmp, *flags, "--global-batch-size", "2", dropout=True))
             for name, flags in recompute.items()}
    out["recompute"] = {name: max((a - b).abs().max().item() for a, b in zip(grads["none"], g))
                        for name, g in grads.items()}
    out["grad_scale"] = max(g.abs().max().item() for g in grads["none"])
    return out


@pytest.fixture(scope="module")
def tp2_pp2(tiny_dataset, tmp_path_factory):
    return run_distributed(_session, 4, args=(tiny_dataset, str(tmp_path_factory.mktemp("fast_path"))),
                           threads=1)


@pytest.mark.integration
@pytest.mark.slow
def test_broadcast_from_tensor_parallel_rank0_gives_the_losses_of_every_rank_reading(tp2_pp2):
    for rank in tp2_pp2:
        assert rank["broadcast"] == rank["every_rank_reads"]  # bit for bit
        assert len(rank["broadcast"]["train"]) == 2 and all(v is not None for v in rank["broadcast"]["train"])
    assert all(r["broadcast"] == tp2_pp2[0]["broadcast"] for r in tp2_pp2)


@pytest.mark.integration
@pytest.mark.slow
def test_virtual_pipeline_gives_the_plain_pipeline_loss_and_reshards(tp2_pp2):
    for rank in tp2_pp2:
        assert rank["vp_chunks"] == 2
        assert rank["vp"]["train"] == pytest.approx(rank["broadcast"]["train"], rel=1e-5)
        assert rank["vp"]["valid"] == pytest.approx(rank["broadcast"]["valid"], rel=1e-5)
        assert rank["vp_as_plain"]["train"] == []  # nothing left to train: the checkpoint's last iteration
        assert rank["vp_as_plain"]["valid"] == pytest.approx(rank["vp"]["valid"], rel=1e-6)


@pytest.mark.integration
@pytest.mark.slow
def test_recomputation_gives_the_gradients_of_no_recomputation(tp2_pp2):
    for rank in tp2_pp2:
        assert rank["grad_scale"] > 0
        for name, diff in rank["recompute"].items():
            assert diff <= 1e-6 * rank["grad_scale"], (name, diff)


# --- single process: profiler, bf16 wrapping ------------------------------------------------------------------

def _profile_and_bf16(rank, world, tmp):
    from megatron_anchor.training.loop import run

    out = {}
    res = run(_setup(["--mock-data", "--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32",
                      "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2",
                      "--train-iters", "3", "--eval-iters", "0", "--log-interval", "1", "--profile",
                      "--profile-step-start", "2", "--profile-step-end", "2", "--profile-dir", tmp]))
    out["trace"] = res.profile_trace
    out["flops"] = [m.get("TFLOP/s/GPU") for m in res.train]

    # bf16 as Megatron-LM builds it: Float16Module around each chunk, bf16 weights, fp32 output.
    from megatron.core.transformer.module import Float16Module

    from megatron_anchor.training import initialize
    from megatron_anchor.training.model import build_model_chunks, build_transformer_config, model_provider

    cfg = parse_args(["--mock-data", "--vocab-size", "64", "--num-layers", "2", "--hidden-size", "32",
                      "--num-attention-heads", "4", "--seq-length", "16", "--hidden-dropout", "0",
                      "--attention-dropout", "0", "--bf16"])
    validate(cfg, 1, True, False)  # as on a GPU; the model itself runs on CPU
    initialize.initialize_distributed(cfg)
    initialize.set_seeds(1)
    chunk = build_model_chunks(cfg, 64, model_provider, torch.device("cpu"), build_transformer_config(cfg))[0]
    cfg.training.bf16 = False
    initialize.set_seeds(1)
    reference = build_model_chunks(cfg, 64, model_provider, torch.device("cpu"), build_transformer_config(cfg))[0]
    tokens = torch.randint(0, 64, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        low, full = (m(tokens, positions, None, labels=tokens) for m in (chunk, reference))
    out["bf16"] = (isinstance(chunk, Float16Module), {p.dtype for p in chunk.parameters()}, low.dtype,
                   (low - full).abs().max().item() / full.abs().max().item())
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run_distributed(_profile_and_bf16, 1, args=(str(tmp_path_factory.mktemp("profile")),))[0]


@pytest.mark.integration
def test_profiler_writes_a_trace_of_the_chosen_steps(single):
    assert single["trace"] and os.path.basename(single["trace"]).startswith("rank0.")
    with open(single["trace"], encoding="utf-8") as fh:
        events = json.load(fh)["traceEvents"]
    assert any(str(e.get("name", "")).startswith("aten::") for e in events)
    assert all(f > 0 for f in single["flops"])


@pytest.mark.integration
def test_bf16_chunks_are_float16_modules_with_bf16_weights(single):
    is_wrapped, dtypes, out_dtype, rel = single["bf16"]
    assert is_wrapped and dtypes == {torch.bfloat16}
    assert out_dtype == torch.float32  # the last stage casts back, as megatron's loss expects
    assert 0 < rel < 2e-2  # bf16 rounding, nothing more


def test_docs_list_every_flag():
    import re

    from megatron_anchor.training.arguments import build_parser
    from tests.distributed import REPO_ROOT

    with open(os.path.join(REPO_ROOT, "docs", "trainer.md"), encoding="utf-8") as fh:
        doc = fh.read()
    flags = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")]
    missing = [f for f in flags if not re.search(re.escape(f) + r"(?![a-z0-9-])", doc)]
    assert not missing, f"docs/trainer.md does not list {missing}"


def _gloo_twin_session(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_anchor.training.batch import HEADER_BYTES, gloo_twin

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    tp = ps.get_tensor_model_parallel_group()
    twin = gloo_twin(tp)
    same = gloo_twin(tp) is twin  # cached: made once per process
    if ps.get_tensor_model_parallel_rank() == 0:
        header = encode_header({"tensors": {}, "scalars": {"from": rank}, "size": 0})
    else:
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
    dist.broadcast(header, ps.get_tensor_model_parallel_src_rank(), group=twin)
    return dist.get_process_group_ranks(twin), same, dist.get_backend(twin), decode_header(header)["scalars"]["from"]


@pytest.mark.integration
def test_headers_travel_between_host_memories_over_a_gloo_twin_of_each_tensor_parallel_group():
    """On a GPU the tensor-parallel group is NCCL; the batch headers go over a gloo group with the same members, so
    no receiver reads anything back from its device. Here (gloo everywhere) the twin is made the same way."""
    results = run_distributed(_gloo_twin_session, 4, threads=1)
    assert [r[0] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(r[1] and r[2] == "gloo" for r in results)
    assert [r[3] for r in results] == [0, 0, 2, 2]
