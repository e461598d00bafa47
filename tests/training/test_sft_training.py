"""Anchored SFT with the trainer: exact zero gradient from prompt and annotation tokens, and an end-to-end run
(pretrain tiny -> preprocess SFT -> anchored SFT from the checkpoint) through torchrun on CPU.

The trainer runs in child processes (``python tests/training/test_sft_training.py grad ...`` and ``torchrun
pretrain_anchor.py``) so its process group and megatron's global state never touch the pytest process.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.paths import REPO

MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
         "--micro-batch-size", "4", "--global-batch-size", "8", "--seed", "7"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _run(cmd, timeout=300):
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _torchrun(args):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                "pretrain_anchor.py", *args])
    losses = [float(x) for x in re.findall(r"iteration +\d+/ *\d+ \| lm loss: ([0-9.E+-]+)", out)]
    return losses, out


# ------------------------------------------------------------------------------------------------------------
# Gradient check (child process)
# ------------------------------------------------------------------------------------------------------------

SAMPLE = {"prompt": "Tell me about the oven in Lyon.", "response": "The oven is hot and the bread is good.",
          "annotation": [["topic", "cooking"], ["entities", "Lyon"], ["tone", "neutral"]]}


def _grad_worker(data_prefix, sp_model, cache):
    """Gradients through the trainer's own forward step and loss under sft-anchored, with the labels at one
    group of positions replaced by other ids; returns, per group, whether the gradients stayed bit-identical."""
    import numpy as np
    import torch

    import pretrain_anchor as pa
    from megatron_anchor.data.sft import TEMPLATE_PRESETS, parse_sample, sample_segments
    from megatron_anchor.roles import Role
    from megatron_anchor.tokenizer import build_tokenizer
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import setup
    from tests.distributed import gradients

    cfg = parse_args(["--data-path", data_prefix, "--tokenizer-type", "SentencePieceTokenizer",
                      "--tokenizer-model", sp_model, "--split", "100,0,0", "--data-cache-path", cache,
                      "--loss-mask-policy", "sft-anchored", "--hidden-dropout", "0", "--attention-dropout", "0",
                      "--train-iters", "1", "--eval-iters", "0", *MODEL[:-6], "--micro-batch-size", "2",
                      "--global-batch-size", "2"])
    tr = setup(cfg, pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)
    seq = cfg.model.seq_length
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    sample = parse_sample(SAMPLE, "x")
    rows = []
    for stable in (False, True):
        segs = sample_segments(sample, TEMPLATE_PRESETS["simple"], True, stable, tok.eod_segment())
        (ids, roles), = tok.encode_segments([segs])
        pad = seq + 1 - len(ids)
        rows.append((np.concatenate([ids, np.full(pad, tok.eod)]).astype(np.int64),
                     np.concatenate([roles, np.zeros(pad, np.uint8)]).astype(np.int64)))
    assert np.array_equal(rows[0][0], rows[1][0])  # same tokens; only the roles differ
    ids = torch.tensor(np.stack([r[0] for r in rows]))
    roles = torch.tensor(np.stack([r[1] for r in rows]))
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:].clone(), "roles": roles[:, 1:],
             "loss_mask": torch.ones(2, seq), "position_ids": torch.arange(seq).expand(2, seq)}
    normal, stable = batch["roles"][0], batch["roles"][1]
    groups = {
        "prompt": (0, normal == Role.PROMPT),
        "annotation keys": (0, normal == Role.ANNOTATION_KEY),
        "annotation values": (0, normal == Role.ANNOTATION_VALUE),
        "format-stable keys": (1, normal == Role.ANNOTATION_KEY),  # same positions, role RESPONSE in row 1
        "format-stable values": (1, stable == Role.ANNOTATION_VALUE),
        "response": (0, normal == Role.RESPONSE),
    }

    g0 = gradients(tr, batch)
    out = {"format-stable key roles": sorted(set(stable[normal == Role.ANNOTATION_KEY].tolist()))}
    gen = torch.Generator().manual_seed(0)
    for name, (row, where) in groups.items():
        changed = {k: v.clone() for k, v in batch.items()}
        labels = changed["labels"][row]
        noise = (labels + 1 + torch.randint(0, 50, labels.shape, generator=gen)) % tok.vocab_size
        changed["labels"][row] = torch.where(where, noise, labels)
        g1 = gradients(tr, changed)
        out[name] = {"positions": int(where.sum()),
                     "identical": all(torch.equal(a, b) for a, b in zip(g0, g1))}
    return out


def test_prompt_and_annotation_tokens_give_exactly_zero_gradient(sft_data, sp_model, tmp_path):
    result_path = tmp_path / "grad.json"
    _run([sys.executable, os.path.abspath(__file__), "grad", sft_data["anchored"], sp_model,
          str(tmp_path / "cache"), str(result_path)])
    res = json.loads(result_path.read_text())
    assert res["format-stable key roles"] == [5]  # Role.RESPONSE
    for name in ("prompt", "annotation keys", "annotation values", "format-stable values"):
        assert res[name]["positions"] > 0 and res[name]["identical"], (name, res[name])
    for name in ("format-stable keys", "response"):  # these carry loss: changing their labels must matter
        assert res[name]["positions"] > 0 and not res[name]["identical"], (name, res[name])


# ------------------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------------------


def _falls(losses):
    return len(losses) >= 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3


@pytest.mark.integration
def test_pretrain_then_anchored_sft_from_the_checkpoint(tiny_dataset, sft_data, sp_model, tmp_path):
    common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
              "--data-cache-path", str(tmp_path / "cache"), "--log-interval", "1", "--eval-iters", "1",
              "--hidden-dropout", "0", "--attention-dropout", "0", *MODEL]
    ck = str(tmp_path / "pretrained")
    pre, _ = _torchrun(["--data-path", tiny_dataset["prefix"], "--split", "98,2,0", "--train-iters", "20",
                        "--lr", "3e-3", "--lr-warmup-iters", "2", "--loss-mask-policy", "pretrain",
                        "--save", ck, *common])
    assert len(pre) == 20 and _falls(pre), pre
    sft, out = _torchrun(["--data-path", sft_data["anchored"], "--split", "95,5,0", "--train-iters", "20",
                          "--lr", "1e-3", "--lr-warmup-iters", "2", "--loss-mask-policy", "sft-anchored",
                          "--reset-attention-mask", "--reset-position-ids",
                          "--finetune", "--load", ck, *common])
    assert "policy sft-anchored" in out and "starting at iteration 0" in out
    assert len(sft) == 20 and _falls(sft), sft
    # Fine-tuning starts from the pretrained weights: its first loss is far below a fresh model's.
    fresh, _ = _torchrun(["--data-path", sft_data["anchored"], "--split", "95,5,0", "--train-iters", "1",
                          "--loss-mask-policy", "sft-anchored", *common])
    assert sft[0] < fresh[0] - 1.0, (sft[0], fresh[0])


@pytest.mark.integration
def test_standard_sft_baseline_trains(sft_data, sp_model, tmp_path):
    losses, _ = _torchrun(["--data-path", sft_data["standard"], "--split", "95,5,0", "--train-iters", "12",
                           "--lr", "3e-3", "--loss-mask-policy", "sft-standard", "--tokenizer-type",
                           "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--data-cache-path",
                           str(tmp_path / "cache"), "--log-interval", "1", "--eval-iters", "1", *MODEL])
    assert _falls(losses), losses


if __name__ == "__main__":
    if sys.argv[1] == "grad":
        result = _grad_worker(*sys.argv[2:5])
        with open(sys.argv[5], "w") as f:
            json.dump(result, f)
        from megatron_anchor.training.initialize import shutdown

        shutdown()
