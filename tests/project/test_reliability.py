"""The pieces behind "nothing lost, nothing hung, no traceback": declared ranges, the atomic-write helper and
output checks, export's overwrite rule, checkpoint file checks, the loss-policy check, the one-process store,
the annotator server's API key, and tripwires that keep the inputs the tools parse free of code execution.
The table of bad inputs through every tool is tests/cli/test_faults.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_anchor import bounds
from megatron_anchor.outputs import (
    OutputError,
    atomic_folder,
    atomic_write,
    check_outputs,
    check_writable,
    refuse_aliases,
)
from tests.paths import REPO


# -- ranges ---------------------------------------------------------------------------------------------------


def test_bounds_describe_and_refuse():
    b = bounds.Bounds(ge=0, lt=1)
    assert b.describe() == "in [0, 1)" and b.problem(0.5) is None and b.problem(None) is None
    assert b.problem(1.0) == "must be in [0, 1), got 1"
    assert bounds.Bounds(gt=0).problem(0) == "must be > 0, got 0"
    assert bounds.Bounds().problem(float("nan")) == "must be a finite number, got nan"
    assert bounds.Bounds().problem(float("inf")) == "must be a finite number, got inf"
    assert bounds.Bounds(ge=1).problem(2.5, integer=True) == "must be an integer, got 2.5"
    assert bounds.Bounds().problem("3") == "must be a number, got '3'"
    assert bounds.Bounds().problem(True) is not None  # a YAML 'yes' is not a number


def test_config_ranges_are_checked_on_nested_configs_and_lists():
    from megatron_anchor.training.config import AnchorConfig

    cfg = AnchorConfig()
    assert bounds.problems(cfg) == []
    cfg.model.seq_length = 0
    cfg.training.lr = float("nan")
    cfg.logging.profile_ranks = [0, -1]
    cfg.model.num_layers = 2.0  # a YAML float that is a whole number is fine
    found = bounds.problems(cfg)
    assert "--seq-length: must be >= 1, got 0" in found
    assert "--lr: must be a finite number, got nan" in found
    assert "--profile-ranks: must be >= 0, got -1" in found
    assert len(found) == 3


def test_flags_refuse_out_of_range_values_and_help_shows_the_range(capsys):
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.cli import generate, train_tokenizer

    for argv, flag in ((["--seq-length", "0"], "--seq-length: must be >= 1, got 0"),
                       (["--lr", "nan"], "--lr: must be a finite number, got nan"),
                       (["--hidden-dropout", "1"], "--hidden-dropout: must be in [0, 1), got 1"),
                       (["--profile-ranks", "0", "-2"], "--profile-ranks: must be >= 0, got -2")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and len(err.splitlines()) <= 3, err  # the reason, not 100 lines of usage
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Sequence length of a training sample (tokens). (default: 128) [>= 1]" in help_text
    assert "[in [0, 1)]" in help_text
    for parser in (generate.build_parser(), train_tokenizer.get_parser()):
        help_text = " ".join(parser.format_help().split())
        assert "[>= 0]" in help_text or "[in [259, 1048576]]" in help_text


def test_yaml_values_get_the_same_checks(tmp_path):
    from megatron_anchor.training.arguments import ConfigError, load_yaml, validate

    cfg = load_yaml(_yaml(tmp_path, "lr: 3e-4\nprofile_ranks: ['1']\n"))
    assert cfg.training.lr == 3e-4 and cfg.logging.profile_ranks == [1]  # YAML 1.1 reads 3e-4 as text
    cfg = load_yaml(_yaml(tmp_path, "mock_data: true\ntokenizer_type: NullTokenizer\nvocab_size: 300\n"
                                    "num_layers: two\nmicro_batch_size: -1\n"))
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1, False, False)
    assert "--num-layers: must be an integer, got 'two'" in str(err.value)
    assert "--micro-batch-size: must be >= 1, got -1" in str(err.value)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(_yaml(tmp_path, "model: {num_layers: [\n"))
    with pytest.raises(ConfigError, match="setting names must be text, got 3"):
        load_yaml(_yaml(tmp_path, "3: 4\n"))
    with pytest.raises(ConfigError, match="setting names must be text, got 1 under model"):
        load_yaml(_yaml(tmp_path, "model: {1: 2}\n"))


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_data_path_weights_must_be_finite_and_not_all_zero():
    from megatron_anchor.training.arguments import ConfigError, parse_data_path

    assert parse_data_path(["0", "a", "1", "b"]) == (["a", "b"], [0.0, 1.0])
    for weights in (["0", "0"], ["-1", "2"], ["nan", "1"], ["inf", "1"]):
        with pytest.raises(ConfigError, match="--data-path weights"):
            parse_data_path([weights[0], "a", weights[1], "b"])


# -- writing outputs ------------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    with atomic_write(path) as f:  # creates the folder
        f.write("first")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half of the second")
            raise RuntimeError("the writer fails midway")
    assert path.read_text() == "first"
    assert os.listdir(path.parent) == ["out.txt"]  # the temporary file is gone
    with pytest.raises(ValueError):
        with atomic_write(path, "a"):
            pass


@pytest.mark.parametrize("named", [False, True])
def test_atomic_folder_swaps_whole_folders_or_nothing(tmp_path, named):
    out = tmp_path / "sub" / "model"
    tmp = tmp_path / "sub" / "model.tmp-x" if named else None
    if named:  # a leftover of a killed run under the fixed name is cleared first
        tmp.mkdir(parents=True)
        (tmp / "stale").write_text("?")
    with atomic_folder(out, tmp=tmp) as work:  # creates the parent folder
        assert os.listdir(work) == []
        (Path(work) / "a").write_text("first")
    assert sorted(os.listdir(out)) == ["a"]
    with pytest.raises(RuntimeError):
        with atomic_folder(out, tmp=tmp) as work:
            (Path(work) / "b").write_text("half of the second")
            raise RuntimeError("the writer fails midway")
    assert sorted(os.listdir(out)) == ["a"] and (out / "a").read_text() == "first"
    with atomic_folder(out, tmp=tmp) as work:
        (Path(work) / "b").write_text("second")
    assert sorted(os.listdir(out)) == ["b"]
    assert os.listdir(out.parent) == ["model"]  # no temporary or replaced folder left beside it


def test_aliases_are_found_through_links(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("x\n")
    (tmp_path / "sym.jsonl").symlink_to(src)
    os.link(src, tmp_path / "hard.jsonl")
    for out in ("in.jsonl", "sym.jsonl", "hard.jsonl", "./in.jsonl"):
        with pytest.raises(OutputError, match="--output .* is the same file as --input"):
            refuse_aliases([("--output", str(tmp_path / out))], [("--input", str(src))])
    refuse_aliases([("--output", str(tmp_path / "new.jsonl"))], [("--input", str(src)), ("--schema", None)])


def test_unwritable_outputs_are_named(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="--save .*afile is a file"):
        check_writable(tmp_path / "afile" / "ckpt", "--save", folder=True)
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_outputs([("--output", str(tmp_path))])
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_writable(tmp_path / "afile", "--save", folder=True)
    check_writable(tmp_path / "new" / "deeper" / "x.json", "--output")  # folders are created when written


def test_export_replaces_only_an_earlier_export(tmp_path, monkeypatch):
    from megatron_anchor.export.folder import MARKER, ExportError, check_output_folder

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / MARKER).write_text("{}")
    (earlier / "model.safetensors").write_text("")
    check_output_folder(str(earlier), overwrite=True)
    with pytest.raises(ExportError, match="pass --overwrite"):
        check_output_folder(str(earlier), overwrite=False)
    old = tmp_path / "old_export"  # written before the marker existed: export files only
    old.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (old / name).write_text("{}")
    check_output_folder(str(old), overwrite=True)
    (old / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="notes.txt"):
        check_output_folder(str(old), overwrite=True)
    monkeypatch.chdir(earlier)
    for out in (".", str(tmp_path)):
        with pytest.raises(ExportError, match="current folder"):
            check_output_folder(out, overwrite=True)
    with pytest.raises(ExportError, match="overlap"):
        check_output_folder(str(tmp_path / "ck" / "hf"), overwrite=True, load=str(tmp_path / "ck"))
    with pytest.raises(ExportError, match="overlap"):
        check_output_folder(str(tmp_path / "x"), overwrite=True, load=str(tmp_path / "x" / "ck"))
    check_output_folder(str(tmp_path / "new"), overwrite=False, load=str(tmp_path / "ck"))


@pytest.mark.integration
def test_an_export_is_marked_and_replaced_in_place(tiny_checkpoint, exported, tmp_path):
    """The exported folder carries the marker; exporting again with --overwrite replaces it whole."""
    from megatron_anchor.export.folder import MARKER
    from megatron_anchor.cli import export_hf

    assert os.path.isfile(os.path.join(exported, MARKER))
    out = tmp_path / "hf"
    shutil.copytree(exported, out)
    (out / "model.safetensors").write_bytes(b"stale")
    assert export_hf.main(["--load", tiny_checkpoint["load"], "--output", str(out), "--overwrite",
                           *tiny_checkpoint["args"]]) == 0
    assert (out / "model.safetensors").read_bytes() == (Path(exported) / "model.safetensors").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary or replaced folder left beside it


def test_merge_creates_its_output_folder(tiny_dataset, tmp_path):
    from megatron_anchor.cli import merge_datasets

    out = tmp_path / "not" / "yet" / "merged_text_document"
    assert merge_datasets.main(["--input", tiny_dataset["prefix"], "--output-prefix", str(out)]) == 0
    assert (out.parent / "merged_text_document_roles.idx").is_file()


def test_a_smaller_vocabulary_than_asked_is_reported(corpus_dir, tmp_path, caplog):
    from megatron_anchor.cli import train_tokenizer

    caplog.set_level("WARNING")
    assert train_tokenizer.main(["--input", str(corpus_dir / "raw.jsonl"), "--output-prefix", str(tmp_path / "t"),
                                 "--vocab-size", "100000"]) == 0
    assert re.search(r"the vocabulary has \d+ tokens, not the 100000 asked", caplog.text), caplog.text


# -- checkpoints ----------------------------------------------------------------------------------------------


def test_checkpoint_file_checks(tmp_path):
    from megatron_anchor.training.checkpoint_files import MANIFEST, latest_problems, problems, write_manifest

    ck = tmp_path / "iter_0000002"
    ck.mkdir()
    assert any("metadata.json: missing" in p for p in problems(str(ck)))
    assert any("no .distcp files" in p for p in problems(str(ck)))
    for name, data in (("metadata.json", b"{}"), (".metadata", b"m"), ("common.pt", b"c"), ("__0_0.distcp", b"d" * 9)):
        (ck / name).write_bytes(data)
    write_manifest(str(ck))
    assert problems(str(ck)) == [] and json.loads((ck / MANIFEST).read_text())["files"]["__0_0.distcp"] == 9
    (ck / "__0_0.distcp").write_bytes(b"d" * 4)
    assert problems(str(ck)) == [f"{ck / '__0_0.distcp'}: 4 bytes, the save wrote 9 (truncated or replaced)"]
    (ck / "metadata.json").write_text("[1")
    assert any("metadata.json: unreadable" in p for p in problems(str(ck)))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("two")
    assert latest_problems(str(tmp_path), "latest_checkpointed_iteration.txt") == [
        f"{tmp_path / 'latest_checkpointed_iteration.txt'}: expected an iteration number, found 'two'"]
    assert latest_problems(str(tmp_path / "none"), "latest_checkpointed_iteration.txt") == []


@pytest.mark.integration
def test_a_checkpoint_without_its_tokenizer_record_needs_the_users_word(tiny_checkpoint, tmp_path, capsys):
    from megatron_anchor.cli import generate

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint["load"], ckpt)
    os.remove(ckpt / "tokenizer_record.json")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Tell me about bread."}\n')
    argv = ["--prompts", str(prompts), "--output", str(tmp_path / "s.jsonl"), "--load", str(ckpt),
            "--max-new-tokens", "4", "--n", "2"]
    assert generate.main(argv) == 2
    assert "--allow-missing-tokenizer-record" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists()
    assert generate.main([*argv, "--allow-missing-tokenizer-record"]) == 0
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 2


def test_a_policy_that_leaves_only_eod_with_loss_is_refused(tiny_dataset, sft_data):
    from megatron_anchor.training.arguments import ConfigError
    from megatron_anchor.training.data import check_loss_tokens

    with pytest.raises(ConfigError, match=r"--loss-mask-policy sft-anchored leaves no token but end-of-document "
                                          r"ones with loss .* \(roles there: TEXT"):
        check_loss_tokens(tiny_dataset["prefix"], "sft-anchored")
    check_loss_tokens(tiny_dataset["prefix"], "pretrain")
    check_loss_tokens(sft_data["anchored"], "sft-anchored")
    check_loss_tokens(sft_data["standard"], "sft-standard")


# -- the one-process store ------------------------------------------------------------------------------------

_LISTENERS = textwrap.dedent("""
    import datetime, json, sys
    import psutil
    import torch.distributed as dist
    from megatron_anchor.training.initialize import init_single_process_group
    if sys.argv[1] == "tcp":  # what a tcp:// init method does: a TCPStore server
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
    else:
        init_single_process_group("gloo", datetime.timedelta(minutes=1))
    print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections(kind="inet") if c.status == "LISTEN"]))
""")


def _listening_addresses(mode: str) -> list:
    from tests.annotator_fixtures import free_port

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _LISTENERS, mode, str(free_port())], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_one_process_groups_listen_on_no_wildcard_address():
    """A world of one rendezvous in-process: no socket listens on every interface (a TCP init method's store
    does, whatever address it names; the control run shows the check would see it)."""
    wildcard = {"0.0.0.0", "::"}
    assert not wildcard & set(_listening_addresses("hash"))
    assert wildcard & set(_listening_addresses("tcp"))


# -- the annotator server's API key ---------------------------------------------------------------------------

_FAKE_VLLM = textwrap.dedent("""
    import http.server, json, os, sys
    key = os.environ.get("VLLM_API_KEY", "")
    with open(sys.argv[2], "w") as f:
        json.dump({"env_key": key, "argv": sys.argv, "client_env": os.environ.get("ANNOTATOR_API_KEY")}, f)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/v1") and self.headers.get("Authorization") != "Bearer " + key:
                self.send_response(401); self.end_headers(); return
            body = b"{}" if self.path == "/health" else json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_the_api_key_reaches_vllm_only_through_its_environment(tmp_path, capsys, monkeypatch):
    from megatron_anchor.apikey import Secret
    from tests.annotator_fixtures import free_port
    from megatron_anchor.annotation import server as srv
    from megatron_anchor.cli import annotator_server

    port, seen = free_port(), tmp_path / "seen.json"
    script = tmp_path / "fake_vllm.py"
    script.write_text(_FAKE_VLLM)
    monkeypatch.setenv("ANNOTATOR_API_KEY", "sk-client-side")
    spec = srv.ServerSpec([sys.executable, str(script), str(port), str(seen)], port=port,
                          api_key=Secret("sk-test-4242"))
    assert "sk-test" not in repr(spec)
    proc = srv.start_server(spec, tmp_path / "server.log")
    try:
        assert srv.wait_ready(spec.url, 60, proc, api_key=Secret("sk-test-4242")) == "m"
        assert srv.is_ready(spec.url) is None  # without the key, /v1 is refused
    finally:
        srv.stop_server(proc)
    launched = json.loads(seen.read_text())
    assert launched["env_key"] == "sk-test-4242" and launched["client_env"] is None
    assert not any("sk-test" in a for a in launched["argv"])
    assert "sk-test" not in (tmp_path / "server.log").read_text()

    key_file = tmp_path / "key"
    key_file.write_text("sk-file-777\n")
    assert annotator_server.main(["--backend", "gpu", "--dry-run", "--api-key-file", str(key_file)]) == 0
    out = capsys.readouterr()
    assert "VLLM_API_KEY=***" in out.out and "sk-file" not in out.out + out.err and "warning" not in out.err
    monkeypatch.delenv("ANNOTATOR_API_KEY")
    assert annotator_server.main(["--backend", "gpu", "--dry-run"]) == 0
    assert "without an API key" in capsys.readouterr().err  # 0.0.0.0 and no key: said
    assert annotator_server.main(["--backend", "gpu", "--dry-run", "--host", "127.0.0.1"]) == 0
    assert "without an API key" not in capsys.readouterr().err


# -- jobs configured in code ----------------------------------------------------------------------------------


def test_annotate_job_refuses_settings_that_would_spin(tmp_path):
    from megatron_anchor.annotation.annotate import AnnotateJob
    from megatron_anchor.annotation.annotate_config import AnnotateConfig, AnnotateError
    from megatron_anchor.annotation.llm.client import ClientConfig

    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n')
    client = ClientConfig(urls=["http://127.0.0.1:9"], concurrency=0)
    with pytest.raises(AnnotateError, match="--concurrency: must be >= 1, got 0"):
        AnnotateJob(AnnotateConfig(input=src, output=tmp_path / "o.jsonl", annotator="vllm", client=client))
    with pytest.raises(AnnotateError, match="--window: must be >= 0, got -1"):
        AnnotateJob(AnnotateConfig(input=src, output=tmp_path / "o.jsonl", window=-1))
    with pytest.raises(AnnotateError, match="same file"):
        AnnotateJob(AnnotateConfig(input=src, output=tmp_path / "o.jsonl", cache_path=src))


def test_distilling_only_extractive_keys_trains_no_embedding(corpus_dir):
    """The embedded annotator copies its entities from the text, so every key here gets an extractive head; the
    embedding nobody reads is not trained (it used to crash: "optimizer got an empty parameter list")."""
    from megatron_anchor.annotation.distilled.train import DistillConfig, distill, load_teacher
    from megatron_anchor.annotation.llm.tagschema import TagKey, TagSchema, load_schema

    teacher = corpus_dir / "annotated.jsonl"  # the embedded annotator's tags
    base = load_schema(None)
    schema = TagSchema((TagKey("entities"),), base.keep_unknown, base.max_tags, base.max_value_chars, base.version)
    model, _ = distill(load_teacher(teacher, ["entities"]), schema, DistillConfig(epochs=1, min_steps=0))
    assert all(h.extractor is not None for h in model.heads) and model.embedding.shape[1] == 1
    tags = model.annotate_batch(["Dara met Nadia in Perth."])
    assert tags and all(k == "entities" for k, _ in tags[0])


# -- tripwires: what the tools parse never runs code ----------------------------------------------------------


def _sources():
    for folder in ("megatron_anchor", "tools", "benchmarks"):
        for root, _dirs, files in os.walk(os.path.join(REPO, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, REPO), open(path, encoding="utf-8").read()
    yield "pretrain_anchor.py", open(os.path.join(REPO, "pretrain_anchor.py"), encoding="utf-8").read()


def test_no_parser_of_user_files_can_execute_code():
    """YAML only through safe_load, numpy files never with pickles, torch files only as weights_only, no pickle or
    shell of our own: checkpoints (megatron's and torch's own loading) stay the one trusted input (docs/trainer.md)."""
    bad = []
    for path, text in _sources():
        for pattern, why in ((r"yaml\.(unsafe_)?load\(", "yaml.load"), (r"yaml\.full_load", "yaml.full_load"),
                             (r"shell\s*=\s*True", "shell=True"), (r"\bpickle\.loads?\(", "pickle.load"),
                             (r"\bos\.system\(", "os.system")):
            if re.search(pattern, text):
                bad.append(f"{path}: {why}")
        # numpy without pickles; torch.load only as weights_only (tensors and plain containers, no code).
        for pattern, safe in ((r"np\.load\(", "allow_pickle=False"), (r"\btorch\.load\(", "weights_only=True")):
            for m in re.finditer(pattern, text):
                call = text[m.start(): text.find("\n", m.start())]  # the arguments, up to the line's end
                if safe not in call:
                    bad.append(f"{path}: {call}")
    assert not bad, bad


def test_an_unknown_ability_task_is_named_before_any_model_loads(tmp_path, capsys):
    """Tasks are looked up in lm-eval's index before anything runs, so the error names the task; the model folder
    here is only a config.json, so reaching the model would fail differently."""
    from megatron_anchor.cli import evaluate_ability

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert evaluate_ability.main(["--model", f"m={model}", "--tasks", "no_such_task_xyz", "--demo-task",
                                  str(tmp_path / "tasks"), "--output", str(tmp_path / "a.json")]) == 2
    assert "unknown lm-eval task(s) no_such_task_xyz" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()
