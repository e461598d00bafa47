"""The loss is a global per-token mean: sft-anchored, DP=2 x several micro-batches whose response-token counts
differ widely, gives the gradients of one process over the whole global batch, and not those of a mean of
per-micro-batch means (which the test also computes, to show it can tell the two apart)."""

from __future__ import annotations

import json
import random

import pytest

from tests.distributed import gradients, run_distributed

pytestmark = pytest.mark.integration

MICRO, GLOBAL = 2, 8


def _argv(prefix, sp_model, cache, global_batch):
    return ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--split", "100,0,0", "--data-cache-path", cache, "--loss-mask-policy", "sft-anchored",
            "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "96",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", str(MICRO),
            "--global-batch-size", str(global_batch), "--train-iters", "1", "--eval-iters", "0", "--seed", "5",
            "--reset-attention-mask", "--reset-position-ids"]


def _grads(tr):
    """One global batch through the schedule (megatron's finalize divides by the global token count)."""
    from megatron_anchor.training.step import forward_backward

    for chunk in tr.model:
        chunk.zero_grad_buffer()
    forward_backward(tr, tr.train_iter, forward_only=False)
    return [p.main_grad.clone() for p in tr.model[0].parameters()]


def _session(rank, world, prefix, sp_model, cache):
    import torch

    import pretrain_anchor as pa
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import setup
    from megatron_anchor.training.loss import apply_policy, policy_table

    def trainer(global_batch):
        cfg = parse_args(_argv(prefix, sp_model, cache, global_batch))
        return setup(cfg, pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)

    out = {"global": [g.numpy() for g in _grads(trainer(GLOBAL))]}
    if world == 1:
        # The same micro-batches one at a time, each normalised by its own token count: a mean of means.
        tr = trainer(MICRO)
        per_micro, counts = [], []
        for _ in range(GLOBAL // MICRO):
            batch = next(tr.train_iter)
            counts.append(int(apply_policy(batch["loss_mask"], batch["roles"], policy_table("sft-anchored")).sum()))
            per_micro.append(gradients(tr, batch))
        out["mean_of_means"] = [torch.stack(g).mean(0).numpy() for g in zip(*per_micro)]
        out["counts"] = counts
    return out


@pytest.fixture(scope="module")
def sft_data(corpus_dir, sp_model, tmp_path_factory):
    """Packed SFT data: packs holding one long response, and packs of several one-word responses."""
    from megatron_anchor.cli import preprocess_sft

    d = tmp_path_factory.mktemp("normalisation")
    rng = random.Random(3)
    words = "the oven bread river stone market song winter garden letter".split()
    with open(d / "sft.jsonl", "w") as f:
        for i in range(72):
            n = rng.randint(25, 30) if i < 24 else 1
            f.write(json.dumps({"prompt": "Say something.", "response": " ".join(rng.choices(words, k=n))}) + "\n")
    prefix = str(d / "sft")
    assert preprocess_sft.main(["--input", str(d / "sft.jsonl"), "--output-prefix", prefix, "--tokenizer-type",
                                "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--seq-length", "96",
                                "--overlong", "truncate", "--pack", "--no-progress"]) == 0
    return prefix + "_text_document", str(d / "cache")


def test_dp2_micro_batches_equal_one_process_global_mean(sft_data, sp_model):
    import numpy as np

    prefix, cache = sft_data
    single = run_distributed(_session, 1, args=(prefix, sp_model, cache))[0]
    dp2 = run_distributed(_session, 2, args=(prefix, sp_model, cache))
    counts = single["counts"]
    assert max(counts) >= 3 * min(counts), f"micro-batch token counts too alike for the test: {counts}"
    for rank_result in dp2:
        for a, b in zip(rank_result["global"], single["global"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # The control: a mean of per-micro-batch means is measurably different, so the check above can fail.
    diff = max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
               for a, b in zip(single["mean_of_means"], single["global"]))
    assert diff > 0.05, diff
