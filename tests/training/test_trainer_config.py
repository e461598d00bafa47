"""Flags, YAML, early errors, loss-mask policies and the loss function (single process, no process group)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from megatron_anchor.roles import Role
from megatron_anchor.training.arguments import ConfigError, parse_args, parse_data_path, validate
from megatron_anchor.training.loss import apply_policy, loss_func, policy_table
from megatron_anchor.training.model import padded_vocab_size


def _base(*extra):
    return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "300", *extra]


def _validate(argv, world=1, cuda=False, te=False):
    cfg = parse_args(argv)
    validate(cfg, world, cuda, te)
    return cfg


def test_megatron_flag_names_map_onto_dataclasses():
    cfg = parse_args(_base("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "8",
                           "--seq-length", "256", "--micro-batch-size", "1", "--global-batch-size", "16",
                           "--train-iters", "10", "--lr", "2e-4", "--min-lr", "2e-5", "--lr-decay-style", "linear",
                           "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--clip-grad", "0.5",
                           "--split", "98,2,0", "--save", "s", "--load", "l", "--save-interval", "5",
                           "--eval-interval", "5", "--eval-iters", "1", "--log-interval", "1", "--seed", "3",
                           "--finetune", "--swiglu", "--untie-embeddings-and-output-weights"))
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.model.num_layers == 4
    assert cfg.training.lr == 2e-4 and cfg.training.lr_decay_style == "linear"
    assert cfg.checkpoint.finetune and cfg.model.swiglu and cfg.model.untie_embeddings_and_output_weights
    validate(cfg, 8, False, False)
    assert cfg.model.ffn_hidden_size == 384  # 8/3 * 128 rounded up to 64 for SwiGLU


def test_help_text_comes_from_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--loss-mask-policy" in out and "response" in out and "--tensor-model-parallel-size" in out


def test_yaml_config_then_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden-size: 96\ntraining:\n  lr: 0.01\n"
                    "num-attention-heads: 6\nloss_mask_policy: sft-anchored\ndata_path: '1 a 2 b'\n")
    cfg = parse_args(["--config", str(path), "--lr", "0.5"])
    assert cfg.model.num_layers == 6 and cfg.model.hidden_size == 96 and cfg.model.num_attention_heads == 6
    assert cfg.training.lr == 0.5 and cfg.training.loss_mask_policy == "sft-anchored"
    assert parse_data_path(cfg.data.data_path) == (["a", "b"], [1.0, 2.0])
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layerz: 3\n")
    with pytest.raises(ConfigError, match="num_layerz"):
        parse_args(["--config", str(bad)])


def test_unknown_flag_and_bad_choice_exit():
    with pytest.raises(SystemExit):
        parse_args(_base("--no-such-flag"))
    with pytest.raises(SystemExit):
        parse_args(_base("--loss-mask-policy", "everything"))


@pytest.mark.parametrize("argv,world,message", [
    (["--tensor-model-parallel-size", "3", "--num-attention-heads", "4"], 3, "not divisible by TP"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "3"], 2, "num-layers (3) is not divisible by PP"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible"),
    (["--micro-batch-size", "2", "--global-batch-size", "6"], 2, "global-batch-size (6)"),
    (["--group-query-attention", "--num-query-groups", "3", "--num-attention-heads", "4"], 1, "num-query-groups"),
    (["--tensor-model-parallel-size", "2", "--group-query-attention", "--num-query-groups", "1"], 2,
     "num-query-groups (1) is not divisible by TP"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2, "sequence-parallel"),
    (["--dist-ckpt-optim-fully-reshardable"], 2, "applies to --use-distributed-optimizer only"),
    (["--finetune"], 1, "--finetune needs --load"),
    (["--loss-mask-policy", "sft-anchored"], 1, "needs the role channel"),
    (["--bf16", "--fp8-format", "hybrid"], 1, "needs the Transformer Engine layers on a GPU"),
    (["--lr-warmup-iters", "100", "--train-iters", "100"], 1, "lr-warmup-iters"),
    (["--save-interval", "10"], 1, "--save-interval needs --save"),
    (["--position-embedding-type", "rope", "--reset-position-ids"], 1, "use --reset-attention-mask"),
    (["--position-embedding-type", "rope", "--reset-position-ids", "--reset-attention-mask"], 1,
     "does nothing with RoPE"),
    (["--exit-signal", "SIGNOPE"], 1, "is not a signal name"),
    (["--min-lr", "0.1", "--lr", "0.01"], 1, "--min-lr (0.1) exceeds --lr (0.01)"),
])
def test_impossible_layouts_and_flag_combinations_fail_early(argv, world, message):
    with pytest.raises(ConfigError) as err:
        _validate(_base(*argv), world)
    assert message in str(err.value)


def test_data_path_or_mock_required():
    with pytest.raises(ConfigError, match="--data-path is required"):
        _validate(["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"])


def test_vocab_padding_for_tensor_parallel():
    assert padded_vocab_size(300, 128, 1) == 384
    assert padded_vocab_size(300, 128, 2) == 512
    assert padded_vocab_size(512, 128, 4) == 512


def test_policy_tables():
    codes = torch.tensor([int(r) for r in Role])
    pre = policy_table("pretrain")[codes]
    assert pre.tolist() == [0, 1, 1, 1, 1, 1, 1]  # PAD is the only role without loss
    for policy in ("sft-anchored", "sft-standard"):
        kept = {Role(int(c)) for c, v in zip(codes, policy_table(policy)[codes]) if v}
        assert kept == {Role.RESPONSE, Role.EOD}
    assert policy_table("pretrain")[200] == 0  # unknown codes never carry loss
    with pytest.raises(ValueError):
        policy_table("nope")


def test_policy_combines_with_megatron_mask():
    roles = torch.tensor([[Role.PROMPT, Role.ANNOTATION_KEY, Role.RESPONSE, Role.RESPONSE, Role.EOD, Role.PAD]])
    megatron_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    mask = apply_policy(megatron_mask, roles, policy_table("sft-anchored"))
    assert mask.tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0, 0.0]]


def test_loss_func_masked_positions_get_exactly_zero_gradient():
    losses = torch.tensor([[2.0, 3.0, float("1e30"), 5.0]], requires_grad=True)
    roles = torch.tensor([[Role.TEXT, Role.ANNOTATION_VALUE, Role.PROMPT, Role.TEXT]])
    mask = apply_policy(torch.ones(1, 4), roles, policy_table("pretrain"))
    mask[0, 2] = 0.0
    loss_sum, num_tokens, report = loss_func(mask, roles, losses, report_role_losses=True)
    loss_sum.backward()
    assert losses.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]
    assert int(num_tokens) == 3 and float(loss_sum.detach()) == 10.0
    assert report["annotation loss"].tolist() == [3.0, 1.0]
    assert report["text loss"].tolist() == [7.0, 2.0]


def _run_main(argv):
    import pretrain_anchor

    with pytest.raises(SystemExit) as exc:
        pretrain_anchor.main(argv)
    return exc.value.code


def _data_argv(prefix, tokenizer, *extra):
    return ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer,
            "--split", "90,10,0", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "64", "--train-iters", "2", *extra]


def test_missing_role_channel_fails_before_any_step(tiny_dataset, tmp_path, capsys):
    import torch.distributed as dist

    prefix = str(tmp_path / "noroles_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_dataset["prefix"] + ext, prefix + ext)
    assert _run_main(_data_argv(prefix, tiny_dataset["tokenizer_model"])) == 2
    err = capsys.readouterr().err
    assert "role channel" in err and "_roles" in err
    assert not dist.is_initialized()  # failed before any process group, model or step
    # A stock baseline may train on the same files without roles.
    cfg = parse_args(_data_argv(prefix, tiny_dataset["tokenizer_model"], "--no-role-channel"))
    from megatron_anchor.training.data import check_data_paths

    validate(cfg, 1, False, False)
    check_data_paths(cfg)


def test_mismatched_role_channel_fails_before_any_step(tiny_dataset, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    prefix = str(tmp_path / "bad_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(tiny_dataset["prefix"] + ext, prefix + ext)
    tokens = IndexedDataset(prefix)
    builder = IndexedDatasetBuilder(prefix + "_roles.bin", dtype=np.uint8)
    for i in range(len(tokens)):
        n = len(tokens[i]) - (1 if i == 3 else 0)  # one document's roles one token short
        builder.add_document(np.full(n, int(Role.TEXT), dtype=np.uint8), [n])
    builder.finalize(prefix + "_roles.idx")
    del tokens
    assert _run_main(_data_argv(prefix, tiny_dataset["tokenizer_model"])) == 2
    assert "role channel" in capsys.readouterr().err


def test_empty_split_is_reported_instead_of_hanging(tiny_dataset, capsys):
    argv = _data_argv(tiny_dataset["prefix"], tiny_dataset["tokenizer_model"])
    argv[argv.index("--split") + 1] = "969,30,1"
    assert _run_main(argv) == 2
    err = capsys.readouterr().err
    assert "leaves the test split" in err and "--split 969,30,0" in err, err  # the fix it names is a real one
    # Also when nothing is read from it: megatron-core builds every split with a weight, even for zero samples.
    argv += ["--eval-iters", "0"]
    assert _run_main(argv) == 2
    assert "leaves the test split" in capsys.readouterr().err


def test_missing_data_file(tmp_path, capsys, tiny_dataset):
    assert _run_main(_data_argv(str(tmp_path / "nothing"), tiny_dataset["tokenizer_model"])) == 2
    assert "not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "nothing.bin")


def test_tokenizer_types_are_one_list():
    """The trainer accepts exactly the data tools' tokenizer types (plus NullTokenizer)."""
    from megatron_anchor.tokenizer import TOKENIZER_TYPES

    for name in TOKENIZER_TYPES:
        parse_args(_base("--tokenizer-type", name))
    assert "Llama2Tokenizer" in TOKENIZER_TYPES
    assert _validate(_base("--exit-signal", "usr1")).training.exit_signal == "SIGUSR1"


def test_dataset_tools_write_a_tokenizer_record(tiny_dataset):
    from megatron_anchor.tokenizer import build_tokenizer
    from megatron_anchor.tokenizer.record import dataset_record_path, read_record

    record = read_record(dataset_record_path(tiny_dataset["prefix"]))
    tok = build_tokenizer(tiny_dataset["tokenizer_type"], tiny_dataset["tokenizer_model"])
    assert record["eod_id"] == tok.eod and record["ann_open_id"] == tok.ann_open
    assert record["vocab_size"] == tok.vocab_size and record["packed"] is False and record["annotations"] is True
    assert len(record["model_sha256"]) == 64


def _copy_dataset(prefix, tmp_path, name="copy_text_document"):
    out = str(tmp_path / name)
    for suffix in (".bin", ".idx", "_roles.bin", "_roles.idx", "_tokenizer_record.json"):
        shutil.copy(prefix + suffix, out + suffix)
    return out


def test_dataset_from_another_tokenizer_is_refused(tiny_dataset, tmp_path, capsys):
    import json

    prefix = _copy_dataset(tiny_dataset["prefix"], tmp_path)
    path = prefix + "_tokenizer_record.json"
    record = json.loads(open(path).read())
    record["eod_id"] += 1
    record["eod_text"] = "<other>"
    open(path, "w").write(json.dumps(record))
    assert _run_main(_data_argv(prefix, tiny_dataset["tokenizer_model"])) == 2
    err = capsys.readouterr().err
    assert "written with another tokenizer" in err and "--eod-token '<other>'" in err
    record["eod_id"] -= 1
    record["model_sha256"] = "0" * 64
    open(path, "w").write(json.dumps(record))
    assert _run_main(_data_argv(prefix, tiny_dataset["tokenizer_model"])) == 2
    assert "tokenizer model" in capsys.readouterr().err


def test_packed_data_needs_reset_attention_mask(tiny_dataset, tmp_path, capsys):
    import json

    prefix = _copy_dataset(tiny_dataset["prefix"], tmp_path)
    path = prefix + "_tokenizer_record.json"
    record = json.loads(open(path).read())
    record["packed"] = True
    open(path, "w").write(json.dumps(record))
    assert _run_main(_data_argv(prefix, tiny_dataset["tokenizer_model"], "--dry-run")) == 2
    assert "pass --reset-attention-mask" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config(tiny_dataset, capsys):
    import yaml

    import pretrain_anchor

    result = pretrain_anchor.main(_data_argv(tiny_dataset["prefix"], tiny_dataset["tokenizer_model"], "--dry-run",
                                             "--swiglu"))
    assert result.train == []
    out = capsys.readouterr().out
    assert "configuration valid for world size 1" in out
    assert yaml.safe_load(out.split("\n", 1)[1])["model"]["ffn_hidden_size"] == 192


def test_finetune_refuses_another_architecture_or_tokenizer(tiny_dataset, tmp_path, capsys):
    """The checkpoint's run_config.yaml and tokenizer record are compared before anything is built."""
    import json

    from megatron_anchor.tokenizer import build_tokenizer
    from megatron_anchor.tokenizer.record import checkpoint_record_path, tokenizer_record, write_record
    from megatron_anchor.training.arguments import dump_yaml

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # What --finetune checks before loading (a tracker and the files of its iteration); --dry-run reads no tensor.
    (ckpt / "latest_checkpointed_iteration.txt").write_text("1")
    (ckpt / "iter_0000001").mkdir()
    for name in (".metadata", "common.pt", "__0_0.distcp"):
        (ckpt / "iter_0000001" / name).write_bytes(b"x")
    (ckpt / "iter_0000001" / "metadata.json").write_text("{}")
    trained = _data_argv(tiny_dataset["prefix"], tiny_dataset["tokenizer_model"], "--norm-epsilon", "1e-6",
                         "--position-embedding-type", "rope", "--rotary-base", "500000")
    cfg = _validate(trained)
    dump_yaml(cfg, str(ckpt / "run_config.yaml"))
    tok = build_tokenizer(tiny_dataset["tokenizer_type"], tiny_dataset["tokenizer_model"])
    write_record(checkpoint_record_path(str(ckpt)), tokenizer_record(tok, tiny_dataset["tokenizer_type"]))
    finetune = ["--finetune", "--load", str(ckpt), "--dry-run"]
    # Same architecture (other sequence length and dropout): accepted.
    assert pretrain_ok(trained + finetune + ["--seq-length", "32", "--hidden-dropout", "0"])
    capsys.readouterr()
    # Another norm epsilon, RoPE base and depth: refused, each field named.
    other = _data_argv(tiny_dataset["prefix"], tiny_dataset["tokenizer_model"], "--position-embedding-type",
                       "rope", "--num-layers", "3")
    assert _run_main(other + finetune) == 2
    err = capsys.readouterr().err
    assert "cannot fine-tune from" in err
    for field in ("--norm-epsilon: checkpoint 1e-06, this run 1e-05", "--rotary-base: checkpoint 500000",
                  "--num-layers: checkpoint 2, this run 3"):
        assert field in err, err
    # Same architecture, but the checkpoint's tokenizer had another vocabulary: refused.
    record = json.loads(open(checkpoint_record_path(str(ckpt))).read())
    record["vocab_size"] += 8
    write_record(checkpoint_record_path(str(ckpt)), record)
    assert _run_main(trained + finetune) == 2
    assert "tokenizer: vocab_size" in capsys.readouterr().err


def pretrain_ok(argv):
    import pretrain_anchor

    return pretrain_anchor.main(argv) is not None


def test_launcher_signal_problems_name_what_would_kill_a_save():
    from megatron_anchor.training.guards import launcher_signal_problems

    assert launcher_signal_problems("SIGUSR1", True, {}) == []  # not a torchrun worker
    worker = {"TORCHELASTIC_RUN_ID": "x", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600"}
    assert launcher_signal_problems("SIGTERM", True, worker) == []  # an old torchrun forwards SIGTERM
    old = launcher_signal_problems("SIGUSR1", True, worker)
    assert len(old) == 1 and "before 2.9" in old[0] and "dies of SIGUSR1" in old[0]
    new = dict(worker, TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGINT")
    assert "does not forward SIGUSR1" in launcher_signal_problems("SIGUSR1", True, new)[0]
    assert launcher_signal_problems("SIGUSR1", True, dict(new, TORCHELASTIC_SIGNALS_TO_HANDLE="SIGTERM,SIGUSR1")) == []
    short = launcher_signal_problems("SIGTERM", True, {"TORCHELASTIC_RUN_ID": "x"})
    assert len(short) == 1 and "30 s" in short[0]
    assert launcher_signal_problems("SIGTERM", True, {"TORCHELASTIC_RUN_ID": "x", "PET_SHUTDOWN_TIMEOUT": "600"}) == []
    assert launcher_signal_problems("SIGTERM", False, {"TORCHELASTIC_RUN_ID": "x"}) == []  # nothing to save


def test_an_old_torchrun_is_recognised_whatever_the_environment_says(monkeypatch):
    import torch

    from megatron_anchor.training.guards import launcher_signal_problems

    monkeypatch.setattr(torch, "__version__", "2.6.0+cu124")
    env = {"TORCHELASTIC_RUN_ID": "x", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600",
           "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGUSR1"}  # exported by a script, unread by this torchrun
    assert "before 2.9" in launcher_signal_problems("SIGUSR1", True, env)[0]


def test_the_recipes_read_the_exit_record_the_trainer_writes():
    from megatron_anchor.training.checkpointing import EXIT_RECORD_FILE

    from tests.distributed import REPO_ROOT

    with open(os.path.join(REPO_ROOT, "examples", "gpu", "preemption.sh"), encoding="utf-8") as fh:
        script = fh.read()
    assert f'"$save/{EXIT_RECORD_FILE}"' in script
