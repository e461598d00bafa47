"""Shared fixtures for the generation, export and vLLM tests: a tiny Llama-shaped checkpoint trained by the real
trainer under TP=2 (so loading it exercises resharding), built once per session and reused from disk."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_FLAGS = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--group-query-attention",
               "--num-query-groups", "2", "--seq-length", "64", "--position-embedding-type", "rope",
               "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear"]


def model_args(tiny_dataset):
    """The flags that describe the fixture's model (what generate.py / export_hf.py need)."""
    return ["--tokenizer-type", tiny_dataset["tokenizer_type"], "--tokenizer-model", tiny_dataset["tokenizer_model"],
            *MODEL_FLAGS]


def build_checkpoint(base, tiny_dataset):
    """Train (once per session: the folder is reused) and return the checkpoint directory."""
    ckpt = os.path.join(str(base), "anchor_tiny_ckpt")
    if os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        return ckpt
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(REPO, "pretrain_anchor.py"), "--data-path", tiny_dataset["prefix"], *model_args(tiny_dataset),
           "--tensor-model-parallel-size", "2", "--micro-batch-size", "8", "--train-iters", "30", "--lr", "3e-3",
           "--eval-iters", "0", "--split", "100,0,0", "--clip-grad", "0", "--log-interval", "10",
           "--data-cache-path", os.path.join(str(base), "anchor_tiny_cache"), "--save", ckpt]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return ckpt


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_dataset):
    """``{"load": dir, "args": model flags}`` of a 30-iteration TP=2 pretraining checkpoint."""
    return {"load": build_checkpoint(tmp_path_factory.getbasetemp(), tiny_dataset), "args": model_args(tiny_dataset)}


@pytest.fixture(scope="session")
def tiny_generator(tiny_checkpoint):
    """The fixture checkpoint loaded for sampling."""
    from megatron_anchor.inference import load_from_checkpoint

    return load_from_checkpoint(tiny_checkpoint["args"], tiny_checkpoint["load"])
