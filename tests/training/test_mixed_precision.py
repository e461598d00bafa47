"""bf16 and fp16 on CPU: megatron-core's Float16Module, fp32 main weights, loss scaling and the distributed optimizer,
on real gloo process groups over the session's real token + role dataset.

The GPU path's mixed-precision machinery is megatron-core's own; on CPU it runs through
:mod:`megatron_anchor.cpu_compat`, so these runs exercise what a GPU job does between the kernels: fine-tuning
keeps the loaded weights (the optimizer's fp32 copies are refreshed after the load), a resumed run continues
exactly, NaN/Inf checks fire with and without clipping, fp16's skipped steps (the loss scale settling) coexist with
the overlapped parameter gather, evaluation and saving, and a global batch without loss tokens stays finite.
"""

from __future__ import annotations

import math
import os

import pytest

from tests.distributed import run_distributed
from tests.training.test_trainer_parallel import _argv, _train

pytestmark = pytest.mark.integration

BASE_ITERS = 30
# fp16 loss scale whose first steps overflow (the per-token loss sum is large) and then settle: steps 1-3 are
# skipped on this model and data, so evaluation and saving meet a run that has not updated yet.
FP16 = ["--fp16", "--initial-loss-scale", "8192", "--hysteresis", "1"]
DISTOPT = ["--use-distributed-optimizer"]
OVERLAP = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]


def _no_dropout(data, tmp, *extra, iters=8):
    return _argv(data, tmp, *extra, iters=iters, dropout=False) + ["--log-interval", "1"]


def _setup(argv):
    import pretrain_anchor as pa
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import setup

    return setup(parse_args(argv), pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)


def _aborted(argv, poison):
    """The TrainingAborted message of a run whose ``poison(tr, it)`` runs after each step, else its losses."""
    from megatron_anchor.training.guards import TrainingAborted
    from megatron_anchor.training.loop import run

    tr = _setup(argv)
    try:
        res = run(tr, on_step=lambda it, _m: poison(tr, it))
    except TrainingAborted as exc:
        return str(exc)
    return [m["lm loss"] for m in res.train]


def _zero_token_factory(cfg, device):
    """The real forward step with every loss token masked out: a global batch without loss tokens."""
    import pretrain_anchor as pa

    real = pa.forward_step_factory(cfg, device)

    def forward_step(data_iterator, model):
        output, loss_fn = real(data_iterator, model)

        def zero_loss(output_tensor):
            loss, num_tokens, report = loss_fn(output_tensor)
            return loss * 0, num_tokens * 0, {k: v * 0 for k, v in report.items()}

        return output, zero_loss

    return forward_step


def _session(rank, world, data, tmp):
    import torch

    import pretrain_anchor as pa
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.checkpointing import latest_iteration
    from megatron_anchor.training.loop import pretrain, run

    out = {}
    # A bf16 base model, trained well below ln(vocab).
    base = os.path.join(tmp, "base")
    out["base"] = _train(_no_dropout(data, tmp, "--bf16", "--save", base, iters=BASE_ITERS))
    out["fp32_first"] = _train(_no_dropout(data, tmp, iters=2))["loss"]

    # Fine-tune from it in bf16 (plain DDP, the distributed optimizer) and resume it without optimizer state.
    for name, extra in (("finetune", ["--finetune"]), ("finetune_distopt", ["--finetune", *DISTOPT]),
                        ("no_load_optim", ["--no-load-optim", "--no-load-rng"])):
        ck = os.path.join(tmp, name)
        out[name] = _train(_no_dropout(data, tmp, "--bf16", "--load", base, "--save", ck, "--lr", "1e-4", "--min-lr", "1e-5", *extra,
                                       iters=BASE_ITERS + 4 if name == "no_load_optim" else 4))

    # Resume exactness in bf16 with the distributed optimizer: stop at 4 with a checkpoint, resume to 8.
    ck = os.path.join(tmp, "resume")
    flags = ["--bf16", *DISTOPT]
    out["reference"] = _train(_no_dropout(data, tmp, *flags))
    stopped = run(_setup(_no_dropout(data, tmp, *flags, "--save", ck, "--exit-interval", "4")))
    out["stopped"] = (stopped.exit_reason, latest_iteration(ck))
    out["resumed"] = _train(_no_dropout(data, tmp, *flags, "--load", ck))
    # The same resume with each shard read by one data-parallel rank and exchanged (fully parallel load).
    out["resumed_parallel_load"] = _train(_no_dropout(data, tmp, *flags, "--load", ck, "--ckpt-fully-parallel-load"))

    # The distributed optimizer's fully reshardable form: saved at DP=2, resumed at TP=2 (DP=1); the per-bucket
    # form is refused there before any model is built.
    # (the memory-efficient variant: gathered on each data-parallel group's first rank).
    ck = os.path.join(tmp, "reshard")
    flags = [*DISTOPT, "--dist-ckpt-optim-fully-reshardable", "--distrib-optim-fully-reshardable-mem-efficient"]
    out["reshard_reference"] = _train(_no_dropout(data, tmp, *flags))
    run(_setup(_no_dropout(data, tmp, *flags, "--save", ck, "--exit-interval", "4")))
    out["resharded"] = _train(_no_dropout(data, tmp, *flags, "--load", ck, "--tensor-model-parallel-size", "2"))
    from megatron_anchor.training.arguments import ConfigError

    def refusal(*extra):
        try:
            _setup(_no_dropout(data, tmp, *DISTOPT, "--bf16", "--load", os.path.join(tmp, "resume"), *extra))
        except ConfigError as exc:
            return str(exc)
        return None

    out["refused"] = refusal("--tensor-model-parallel-size", "2")
    out["refused_buckets"] = refusal("--overlap-grad-reduce")

    # NaN/Inf checks under bf16: poisoned gradients without clipping (no norm from the optimizer's clip), and
    # poisoned weights.
    def poison_grads(tr, it):
        if it == 2 and rank == 1:
            param = list(tr.model[0].module.parameters())[-1]
            param.register_hook(lambda g: g * float("nan"))

    def poison_weights(tr, it):
        if it == 2 and rank == 1:
            with torch.no_grad():
                next(tr.model[0].module.parameters()).fill_(float("nan"))

    out["nan_grad_noclip"] = _aborted(_no_dropout(data, tmp, "--bf16", "--clip-grad", "0", *DISTOPT), poison_grads)
    out["nan_loss"] = _aborted(_no_dropout(data, tmp, "--bf16"), poison_weights)
    out["noclip_norms"] = _train(_no_dropout(data, tmp, "--bf16", "--clip-grad", "0", iters=3))["grad_norm"]

    # fp16 with skipped steps: plain DDP, then the distributed optimizer with overlapped reduce and gather while
    # evaluating every step and saving at step 2 (both before the first successful update), then a resume.
    out["fp16_plain"] = _train(_no_dropout(data, tmp, *FP16))
    ck = os.path.join(tmp, "fp16_overlap")
    overlapped = _no_dropout(data, tmp, *FP16, *OVERLAP, "--eval-interval", "1", "--save", ck)
    first = run(_setup(overlapped + ["--exit-interval", "2"]))
    out["fp16_first"] = ([m["skipped"] for m in first.train], first.exit_reason, latest_iteration(ck))
    out["fp16_overlap_resumed"] = _train(overlapped + ["--load", ck])
    out["fp16_overlap"] = _train(_no_dropout(data, tmp, *FP16, *OVERLAP, "--eval-interval", "1"))
    # A plain fp16 checkpoint saved before the first update (no Adam state yet) resumes too.
    ck = os.path.join(tmp, "fp16_plain_early")
    run(_setup(_no_dropout(data, tmp, *FP16, "--save", ck, "--exit-interval", "2")))
    out["fp16_plain_resumed"] = _train(_no_dropout(data, tmp, *FP16, "--load", ck))

    # A global batch without loss tokens: finite weights, no loss reported, in fp32, bf16 and bf16 + distopt.
    for name, extra in (("zero_fp32", []), ("zero_bf16_distopt", ["--bf16", *DISTOPT])):
        res = pretrain(parse_args(_no_dropout(data, tmp, *extra, iters=3)), pa.model_provider,
                       pa.train_valid_test_datasets_provider, _zero_token_factory)
        out[name] = [(m["lm loss"], m["grad norm"]) for m in res.train]
    return out


@pytest.fixture(scope="module")
def session(tiny_dataset, tmp_path_factory):
    return run_distributed(_session, 2, args=(tiny_dataset, str(tmp_path_factory.mktemp("mixed"))))


def test_bf16_trains_like_fp32_on_cpu(session):
    base, fp32 = session[0]["base"]["loss"], session[0]["fp32_first"]
    assert abs(base[0] - fp32[0]) <= 2e-2 * fp32[0], (base[0], fp32[0])  # same weights, bf16 arithmetic
    assert base[-1] < base[0] - 1.0, base


@pytest.mark.parametrize("name", ["finetune", "finetune_distopt", "no_load_optim"])
def test_bf16_finetune_keeps_the_loaded_weights(session, name):
    """The first forward runs on the loaded weights before any update, so the check looks at the steps after it:
    with the optimizer's fp32 copies still at the random init, step 1 would write that init back (loss near
    ln(vocab) from step 2 on)."""
    base_last = session[0]["base"]["loss"][-1]
    losses = session[0][name]["loss"]
    ln_vocab = math.log(512)
    assert base_last < ln_vocab - 1.5
    for loss in losses[1:]:
        assert loss < base_last + 0.25 * (ln_vocab - base_last), (name, losses, base_last)


def test_bf16_distributed_optimizer_resume_is_exact(session):
    reason, saved = session[0]["stopped"]
    assert "--exit-interval 4" in reason and saved == 4
    assert session[0]["resumed"]["loss"] == session[0]["reference"]["loss"][4:]  # exact float equality
    assert session[0]["resumed_parallel_load"]["loss"] == session[0]["reference"]["loss"][4:]


def test_fully_reshardable_distributed_optimizer_state_resumes_under_another_layout(session):
    got, want = session[0]["resharded"]["loss"], session[0]["reshard_reference"]["loss"][4:]
    assert len(got) == len(want) and all(abs(a - b) <= 1e-4 * b for a, b in zip(got, want)), (got, want)
    msg = session[0]["refused"]
    assert msg and "optimizer state: --tensor-model-parallel-size: checkpoint 1, this run 2" in msg, msg
    assert "--no-load-optim" in msg and "--dist-ckpt-optim-fully-reshardable" in msg
    msg = session[0]["refused_buckets"]
    assert msg and "gradient buckets: checkpoint one bucket, this run 40,000,000-element buckets" in msg, msg


def test_bf16_nan_checks_fire_with_and_without_clipping(session):
    for rank_result in session:
        msg = rank_result["nan_grad_noclip"]
        assert isinstance(msg, str) and "NaN or Inf in the gradients at iteration 3" in msg, msg
        msg = rank_result["nan_loss"]
        assert isinstance(msg, str) and "NaN or Inf in the loss at iteration 3 on rank(s) [1]" in msg, msg
    norms = session[0]["noclip_norms"]
    assert all(n is not None and n > 0 for n in norms), norms  # a real norm is logged without clipping


def test_fp16_skipped_steps_with_overlapped_gather_evaluate_save_and_match_plain(session):
    skipped, reason, saved = session[0]["fp16_first"]
    assert skipped == [True, True] and "--exit-interval 2" in reason and saved == 2
    plain, overlap = session[0]["fp16_plain"], session[0]["fp16_overlap"]
    assert plain["grad_norm"][0] is None and plain["grad_norm"][-1] is not None  # skipped, then updating
    assert overlap["loss"] == plain["loss"]
    assert session[0]["fp16_overlap_resumed"]["loss"] == plain["loss"][2:]
    assert session[0]["fp16_plain_resumed"]["loss"] == plain["loss"][2:]
    assert len(overlap["valid"]) == 8 and all(math.isfinite(v) for v in overlap["valid"])


@pytest.mark.parametrize("name", ["zero_fp32", "zero_bf16_distopt"])
def test_a_global_batch_without_loss_tokens_stays_finite(session, name):
    for loss, norm in session[0][name]:
        assert loss is None and norm is not None and math.isfinite(norm) and norm == 0.0


def _interleaved_session(rank, world, data, tmp):
    vp = ["--pipeline-model-parallel-size", "2", "--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1"]
    plain = _train(_no_dropout(data, tmp, "--bf16", *vp, iters=4))
    overlap = _train(_no_dropout(data, tmp, "--bf16", *vp, *OVERLAP, iters=4))
    return plain["loss"], overlap["loss"]


@pytest.mark.slow
def test_interleaved_pipeline_with_overlapped_param_gather_matches_plain(tiny_dataset, tmp_path):
    """PP=2 with two virtual stages per rank x DP=2: the schedule launches the aligned parameter gathers
    (align_param_gather, as Megatron-LM sets it) and the losses equal plain DDP's."""
    results = run_distributed(_interleaved_session, 4, args=(tiny_dataset, str(tmp_path)), threads=1)
    losses = [r for r in results if r[0]]
    assert losses, results
    plain, overlap = losses[-1]
    assert len(plain) == 4 and overlap == plain
