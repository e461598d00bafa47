"""The command line under torchrun: console lines, validation, TensorBoard, wandb offline, --finetune."""

from __future__ import annotations

import glob
import os
import re

import pytest

from tests.distributed import run_torchrun

pytestmark = pytest.mark.integration


def _args(data, tmp, *extra):
    return [
        "pretrain_anchor.py", "--tensor-model-parallel-size", "2",
        "--data-path", data["prefix"], "--tokenizer-type", data["tokenizer_type"],
        "--tokenizer-model", data["tokenizer_model"], "--split", "90,10,0",
        "--data-cache-path", os.path.join(tmp, "cache"),
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
        "--position-embedding-type", "rope", "--swiglu", "--normalization", "RMSNorm",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--log-interval", "2",
        "--eval-iters", "1", *extra,
    ]


LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \| lm loss: (\S+) \| annotation loss: (\S+) \| text loss: (\S+) \| "
                  r"lr: (\S+) \| grad norm: (\S+) \| tokens/s: (\S+) \| TFLOP/s/GPU: (\S+) \|(?: MFU: (\S+)% \|)? "
                  r"peak memory: (\S+) GiB \(rank (\d+)\) \| ms/step: (\S+)")


@pytest.mark.slow
def test_torchrun_logs_tensorboard_wandb_offline_and_finetune(tiny_dataset, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    tmp = str(tmp_path)
    ck = os.path.join(tmp, "ck")
    proc = run_torchrun(_args(tiny_dataset, tmp, "--train-iters", "4", "--eval-interval", "2", "--save", ck,
                              "--tensorboard-dir", os.path.join(tmp, "tb"), "--wandb-project", "anchor-test",
                              "--wandb-save-dir", os.path.join(tmp, "wandb"), "--peak-tflops", "0.001"),
                        nproc=2, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [m.groups() for m in LINE.finditer(proc.stdout)]
    assert [int(g[0]) for g in lines] == [2, 4]
    # Losses, tokens/s, TFLOP/s per GPU, MFU (against --peak-tflops), peak memory per rank, step time.
    assert all(float(g[2]) > 0 and float(g[7]) > 0 and float(g[8]) > 0 for g in lines)
    assert all(g[9] is not None and float(g[9]) > 0 for g in lines)
    assert all(abs(float(g[9]) / 100 / (float(g[8]) / 0.001) - 1) < 0.02 for g in lines)  # MFU = TFLOP/s / peak
    assert all(float(g[10]) > 0.05 and int(g[11]) in (0, 1) and float(g[12]) > 0 for g in lines)
    assert proc.stdout.count("validation at iteration") == 2
    assert glob.glob(os.path.join(tmp, "tb", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(tmp, "wandb", "wandb", "offline-run-*"))
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "4"

    # --finetune: weights only, starts at iteration 0 with a fresh schedule, in another layout (PP=2).
    proc = run_torchrun(_args(tiny_dataset, tmp, "--train-iters", "2", "--load", ck, "--finetune",
                              "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"),
                        nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "starting at iteration 0" in proc.stdout
    assert [int(m.group(1)) for m in LINE.finditer(proc.stdout)] == [2]


def test_bad_layout_fails_on_every_rank_before_any_step(tiny_dataset, tmp_path):
    proc = run_torchrun(_args(tiny_dataset, str(tmp_path), "--train-iters", "2", "--num-attention-heads", "3",
                              "--hidden-size", "48"), nproc=2)
    assert proc.returncode != 0
    assert proc.stderr.count("--num-attention-heads (3) is not divisible by TP (2)") == 2
    assert "iteration" not in proc.stdout
