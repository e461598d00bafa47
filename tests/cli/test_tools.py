"""tools/inspect_dataset.py, tools/merge_datasets.py and tools/train_tokenizer.py, called as a user would."""

import os
import shutil
import subprocess
import sys

import pytest

from megatron_anchor.data.indexed import check_role_channel
from tests.conftest import file_bytes
from megatron_anchor.cli import inspect_dataset, merge_datasets, preprocess_data, train_tokenizer
from tests.paths import REPO


def test_inspect_reports_and_renders(tiny_dataset, capsys):
    rc = inspect_dataset.main(["--input", tiny_dataset["prefix"], "--document", "0",
                               "--tokenizer-type", "SentencePieceTokenizer",
                               "--tokenizer-model", tiny_dataset["tokenizer_model"]])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("OK:")
    assert "ANNOTATION_VALUE" in out and "'<|ann|>topic:'" in out and "EOD" in out


def test_inspect_flags_a_broken_pair(tiny_dataset, tmp_path, capsys):
    broken = str(tmp_path / "b_text_document")
    for suffix in ("", "_roles"):
        for ext in (".bin", ".idx"):
            shutil.copy(tiny_dataset["prefix"] + suffix + ext, broken + suffix + ext)
    with open(broken + "_roles.bin", "r+b") as f:
        f.truncate(10)
    assert inspect_dataset.main(["--input", broken]) == 1
    assert "INVALID" in capsys.readouterr().err


def test_merge_tool_matches_single_run(corpus_dir, sp_model, tmp_path):
    lines = open(corpus_dir / "annotated.jsonl", "rb").read().splitlines(keepends=True)
    common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod",
              "--no-progress"]
    (tmp_path / "all.jsonl").write_bytes(b"".join(lines))
    assert preprocess_data.main(["--input", str(tmp_path / "all.jsonl"), "--output-prefix",
                                 str(tmp_path / "single"), *common]) == 0
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (a, b) in enumerate([(0, 150), (150, 151), (151, len(lines))]):
        (tmp_path / f"s{i}.jsonl").write_bytes(b"".join(lines[a:b]))
        assert preprocess_data.main(["--input", str(tmp_path / f"s{i}.jsonl"), "--output-prefix",
                                     str(shards / f"shard{i}"), *common]) == 0
    out = str(tmp_path / "merged_text_document")
    assert merge_datasets.main(["--input", str(shards), "--output-prefix", out]) == 0
    check_role_channel(out)
    assert list(file_bytes(out).values()) == list(file_bytes(str(tmp_path / "single_text_document")).values())
    assert merge_datasets.main(["--input", str(shards), "--output-prefix", out]) == 1  # exists
    assert merge_datasets.main(["--input", str(tmp_path / "nothing"), "--output-prefix", out + "2"]) == 1


def test_train_tokenizer_errors(tmp_path, capsys):
    assert train_tokenizer.main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", "x"]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("tool", ["preprocess_data", "merge_datasets", "inspect_dataset", "train_tokenizer"])
def test_tools_run_as_scripts(tool):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), "--help"],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and "usage:" in r.stdout
