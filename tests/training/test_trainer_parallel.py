"""Trainer acceptance on real gloo process groups over a real preprocessed dataset.

One 2-process session runs DP=2 (TP=1), TP=2 and PP=2 trainings, the masked-role gradient check and a
PP=2 -> TP=2 reshard; a second kills a TP=2 run after its checkpoint and a third resumes it; a 4-process
session trains TP=2 x PP=2 and reshards the TP=2 checkpoint onto it.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.distributed import gradients, run_distributed

pytestmark = pytest.mark.integration

ITERS = 8


def _argv(data, tmp, *extra, iters=ITERS, dropout=True):
    argv = [
        "--data-path", data["prefix"], "--tokenizer-type", data["tokenizer_type"],
        "--tokenizer-model", data["tokenizer_model"], "--split", "90,10,0",
        "--data-cache-path", os.path.join(tmp, "cache"),
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "1", "--min-lr", "3e-4",
        "--eval-iters", "2", "--log-interval", "4", "--seed", "7",
    ]
    if not dropout:
        argv += ["--hidden-dropout", "0", "--attention-dropout", "0"]
    return argv + list(extra)


def _train(argv, on_step=None):
    import pretrain_anchor as pa
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import pretrain

    res = pretrain(parse_args(argv), pa.model_provider, pa.train_valid_test_datasets_provider,
                   pa.forward_step_factory, on_step=on_step)
    return {
        "loss": [m["lm loss"] for m in res.train],
        "annotation": [m["annotation loss"] for m in res.train],
        "text": [m["text loss"] for m in res.train],
        "grad_norm": [m["grad norm"] for m in res.train],
        "valid": [v["lm loss"] for v in res.valid],
    }


def _grad_check(data, tmp):
    """TP=2: gradients after changing the labels of policy-masked tokens are bit-identical."""
    import torch

    import pretrain_anchor as pa
    from megatron_anchor.roles import Role
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import setup
    from megatron_anchor.training.loss import apply_policy, policy_table

    from unittest import mock

    out = {}
    for policy in ("pretrain", "sft-anchored"):
        cfg = parse_args(_argv(data, tmp, "--tensor-model-parallel-size", "2", "--global-batch-size", "2",
                               "--loss-mask-policy", policy, dropout=False))
        # The SFT policy runs on pretraining data here, whose roles the batch below replaces with SFT-shaped ones:
        # the start-up check that refuses such a run (nothing but EOD would carry loss) is not the subject.
        with mock.patch("megatron_anchor.training.data.check_loss_tokens"):
            tr = setup(cfg, pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)
        batch = next(tr.train_iter)
        gen = torch.Generator().manual_seed(0)  # identical on both TP ranks
        if policy == "sft-anchored":
            # SFT-shaped roles: prompt, annotation key/value, then response and EOD.
            roles = torch.full_like(batch["roles"], int(Role.PROMPT))
            roles[:, 10:14] = int(Role.ANNOTATION_KEY)
            roles[:, 14:20] = int(Role.ANNOTATION_VALUE)
            roles[:, 20:60] = int(Role.RESPONSE)
            roles[:, 60] = int(Role.EOD)
            roles[:, 61:] = int(Role.PAD)
            batch["roles"] = roles
        mask = apply_policy(batch["loss_mask"], batch["roles"], policy_table(policy))
        masked = mask == 0
        if policy == "pretrain":
            # Real pretraining samples rarely hold masked tokens: mask a stretch through megatron's own mask.
            batch["loss_mask"][:, 30:40] = 0
            masked = apply_policy(batch["loss_mask"], batch["roles"], policy_table(policy)) == 0

        g0 = gradients(tr, batch)
        changed = {k: v.clone() for k, v in batch.items()}
        noise = torch.randint(0, 500, changed["labels"].shape, generator=gen)
        changed["labels"] = torch.where(masked, noise, changed["labels"])
        g1 = gradients(tr, changed)
        control = {k: v.clone() for k, v in batch.items()}
        unmasked = (~masked).nonzero()[0]
        control["labels"][unmasked[0], unmasked[1]] = (control["labels"][unmasked[0], unmasked[1]] + 1) % 500
        g2 = gradients(tr, control)
        out[policy] = {
            "masked_count": int(masked.sum()),
            "identical": all(torch.equal(a, b) for a, b in zip(g0, g1)),
            "control_differs": any(not torch.equal(a, b) for a, b in zip(g0, g2)),
        }
    return out


def _two_rank_session(rank, world, data, tmp):
    out = {}
    out["dp2"] = _train(_argv(data, tmp, dropout=False))
    out["tp2"] = _train(_argv(data, tmp, "--tensor-model-parallel-size", "2", dropout=False))
    out["pp2"] = _train(_argv(data, tmp, "--pipeline-model-parallel-size", "2",
                              "--save", os.path.join(tmp, "ck_pp2")))
    # Reshard: the PP=2 checkpoint loaded as TP=2 (at its last iteration: only the final evaluation runs).
    out["pp2_as_tp2"] = _train(_argv(data, tmp, "--tensor-model-parallel-size", "2",
                                     "--load", os.path.join(tmp, "ck_pp2")))
    # Uninterrupted TP=2 run with dropout, checkpoints every 4 steps (the kill/resume reference).
    out["tp2_ref"] = _train(_argv(data, tmp, "--tensor-model-parallel-size", "2",
                                  "--save", os.path.join(tmp, "ck_ref"), "--save-interval", "4"))
    out["grad"] = _grad_check(data, tmp)
    return out


def _killed_session(rank, world, data, tmp):
    def kill_after_checkpoint(iteration, _metrics):
        if iteration == 6:  # checkpoint at 4 is complete; die hard mid-run, no cleanup
            import psutil

            # Like a scheduler killing the job's process tree: the checkpoint writer's helper processes
            # (a multiprocessing manager) go too, instead of lingering as orphans.
            for child in psutil.Process().children(recursive=True):
                child.kill()
            os.kill(os.getpid(), signal.SIGKILL)

    _train(_argv(data, tmp, "--tensor-model-parallel-size", "2", "--save", os.path.join(tmp, "ck_kill"),
                 "--save-interval", "4"), on_step=kill_after_checkpoint)
    return "not killed"


def _resume_session(rank, world, data, tmp):
    ck = os.path.join(tmp, "ck_kill")
    return _train(_argv(data, tmp, "--tensor-model-parallel-size", "2", "--save", ck, "--load", ck,
                        "--save-interval", "4"))


def _four_rank_session(rank, world, data, tmp):
    out = {"tp2pp2": _train(_argv(data, tmp, "--tensor-model-parallel-size", "2",
                                  "--pipeline-model-parallel-size", "2"))}
    # Reshard: the TP=2 reference checkpoint (iteration 8) loaded as TP=2 x PP=2.
    out["tp2_as_tp2pp2"] = _train(_argv(data, tmp, "--tensor-model-parallel-size", "2",
                                        "--pipeline-model-parallel-size", "2",
                                        "--load", os.path.join(tmp, "ck_ref")))
    return out


@pytest.fixture(scope="module")
def sessions(tiny_dataset, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("trainer"))
    two = run_distributed(_two_rank_session, 2, args=(tiny_dataset, tmp))
    killed = run_distributed(_killed_session, 2, args=(tiny_dataset, tmp), allow_killed=True)
    resumed = run_distributed(_resume_session, 2, args=(tiny_dataset, tmp))
    four = run_distributed(_four_rank_session, 4, args=(tiny_dataset, tmp))
    return {"two": two, "killed": killed, "resumed": resumed, "four": four, "tmp": tmp}


def _falls(losses):
    assert all(x is not None for x in losses)
    return sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.2


def test_every_rank_reports_the_same_losses(sessions):
    r0, r1 = sessions["two"]
    assert r0["tp2"]["loss"] == r1["tp2"]["loss"]
    assert r0["pp2"]["loss"] == r1["pp2"]["loss"]


@pytest.mark.parametrize("run", ["dp2", "tp2", "pp2", "tp2_ref"])
def test_two_rank_layouts_train_and_loss_falls(sessions, run):
    result = sessions["two"][0][run]
    assert len(result["loss"]) == ITERS
    assert _falls(result["loss"]), result["loss"]
    # Pretraining reports the annotation and text losses separately.
    assert all(a is not None and t is not None for a, t in zip(result["annotation"], result["text"]))


def test_tp2_pp2_trains_and_loss_falls(sessions):
    result = sessions["four"][-1]["tp2pp2"]
    assert _falls(result["loss"]), result["loss"]


def test_tp2_matches_tp1(sessions):
    dp2, tp2 = sessions["two"][0]["dp2"], sessions["two"][0]["tp2"]
    assert tp2["loss"] == pytest.approx(dp2["loss"], rel=2e-5)
    assert tp2["grad_norm"] == pytest.approx(dp2["grad_norm"], rel=1e-4)
    assert tp2["valid"] == pytest.approx(dp2["valid"], rel=2e-5)


def test_masked_roles_contribute_exactly_zero_gradient(sessions):
    for policy, check in sessions["two"][0]["grad"].items():
        assert check["masked_count"] > 0, policy
        assert check["identical"], f"{policy}: gradients changed when masked labels changed"
        assert check["control_differs"], f"{policy}: changing an unmasked label must change gradients"


def test_kill_after_checkpoint_then_resume_is_bit_identical(sessions):
    assert sessions["killed"] == [None, None], "the killed session should have died at iteration 6"
    reference = sessions["two"][0]["tp2_ref"]
    resumed = sessions["resumed"][0]
    assert len(resumed["loss"]) == ITERS - 4  # resumed from the checkpoint at iteration 4
    assert resumed["loss"] == reference["loss"][4:]  # exact float equality
    assert resumed["grad_norm"] == reference["grad_norm"][4:]
    assert resumed["valid"] == reference["valid"]


def test_reshard_on_load(sessions):
    two = sessions["two"][0]
    assert two["pp2_as_tp2"]["loss"] == []  # loaded at its final iteration: evaluation only
    assert two["pp2_as_tp2"]["valid"][-1] == pytest.approx(two["pp2"]["valid"][-1], rel=1e-5)
    four = sessions["four"][-1]
    assert four["tp2_as_tp2pp2"]["valid"][-1] == pytest.approx(two["tp2_ref"]["valid"][-1], rel=1e-5)
