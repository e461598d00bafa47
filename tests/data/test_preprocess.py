"""tools/preprocess_data.py end to end: content, roles, megatron compatibility, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_anchor.annotation.format import render
from megatron_anchor.annotation.schema import parse_line
from megatron_anchor.data.convert import document_segments
from megatron_anchor.data.indexed import check_role_channel, iter_documents, roles_prefix
from megatron_anchor.roles import Role
from megatron_anchor.tokenizer import build_tokenizer
from tests.conftest import file_bytes
from megatron_anchor.cli import preprocess_data
from tests.paths import REPO


def _run(inp, out, model, *extra):
    return preprocess_data.main(["--input", str(inp), "--output-prefix", str(out),
                                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                                 "--no-progress", *extra])


def _expected_texts(path, annotations=True, eod_text=None):
    from megatron_anchor.annotation.default_annotator import annotate_document

    out = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            doc = annotate_document(parse_line(line, f"{path}:{i}"))
            segs = document_segments(doc, annotations, None)
            out.append(render(segs) + (eod_text or ""))
    return out


def test_decode_equals_serialised_text_and_roles_align(tiny_dataset):
    tok = build_tokenizer("SentencePieceTokenizer", tiny_dataset["tokenizer_model"])
    prefix = tiny_dataset["prefix"]
    check_role_channel(prefix)
    expected = _expected_texts(tiny_dataset["input"], eod_text=tok.eod_text)
    docs = list(zip(iter_documents(prefix), iter_documents(roles_prefix(prefix))))
    assert len(docs) == len(expected)
    with open(tiny_dataset["input"], "rb") as f:
        sources = [parse_line(line, "x") for line in f]
    for (ids, roles), text, src in zip(docs, expected, sources):
        assert tok.decode(ids) == text
        assert len(ids) == len(roles)
        # roles token by token: re-encode each segment and compare
        segs = document_segments(src, True, tok.eod_segment())
        [(ids2, roles2)] = tok.encode_segments([segs])
        assert np.array_equal(ids, ids2) and np.array_equal(roles, roles2)
        assert roles[-1] == Role.EOD and (roles == Role.EOD).sum() == 1
        is_special = (ids == tok.ann_open) | (ids == tok.ann_close)
        assert (roles[is_special] == Role.ANNOTATION_KEY).all()
        text_ids = ids[roles == Role.TEXT]
        assert not np.isin(text_ids, [tok.ann_open, tok.ann_close, tok.eod]).any()


def test_stock_megatron_reads_token_files(tiny_dataset):
    ds = IndexedDataset(tiny_dataset["prefix"])
    roles = IndexedDataset(tiny_dataset["prefix"] + "_roles")
    assert len(ds) == len(roles) > 0
    assert np.array_equal(ds.sequence_lengths, roles.sequence_lengths)
    assert np.array_equal(ds.document_indices, roles.document_indices)
    first = next(iter(iter_documents(tiny_dataset["prefix"])))
    assert np.array_equal(ds[0], first)


def test_no_annotations_baseline_and_raw_input(corpus_dir, sp_model, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert _run(corpus_dir / "raw.jsonl", tmp_path / "plain", sp_model, "--no-annotations") == 0
    prefix = str(tmp_path / "plain_text_document")
    expected = _expected_texts(corpus_dir / "raw.jsonl", annotations=False)
    for ids, roles, text in zip(iter_documents(prefix), iter_documents(roles_prefix(prefix)), expected):
        assert tok.decode(ids) == text
        assert set(np.unique(roles).tolist()) == {int(Role.TEXT)}
    # raw input annotated by the embedded annotator equals the pre-annotated corpus
    assert _run(corpus_dir / "raw.jsonl", tmp_path / "a", sp_model, "--append-eod", "--workers", "2",
                "--docs-per-part", "37") == 0
    assert _run(corpus_dir / "annotated.jsonl", tmp_path / "b", sp_model, "--append-eod") == 0
    a, b = file_bytes(str(tmp_path / "a_text_document")), file_bytes(str(tmp_path / "b_text_document"))
    assert list(a.values()) == list(b.values())


def test_workers_and_hf_tokenizer(corpus_dir, hf_tokenizer_dir, tmp_path):
    outs = []
    for w in ("1", "2"):
        out = tmp_path / f"w{w}"
        assert preprocess_data.main([
            "--input", str(corpus_dir / "annotated.jsonl"), "--output-prefix", str(out),
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_dir,
            "--append-eod", "--workers", w, "--docs-per-part", "50", "--no-progress"]) == 0
        outs.append(list(file_bytes(str(out) + "_text_document").values()))
    assert outs[0] == outs[1]
    check_role_channel(str(tmp_path / "w1_text_document"))


def _big_input(corpus_dir, tmp_path, copies=6):
    path = tmp_path / "big.jsonl"
    data = open(corpus_dir / "raw.jsonl", "rb").read()
    path.write_bytes(data * copies)
    return path


def test_kill_and_resume_is_byte_identical(corpus_dir, sp_model, tmp_path):
    inp = _big_input(corpus_dir, tmp_path)
    args = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod",
            "--docs-per-part", "40", "--no-progress"]
    ref = tmp_path / "ref"
    assert preprocess_data.main(["--input", str(inp), "--output-prefix", str(ref), *args]) == 0
    want = list(file_bytes(str(ref) + "_text_document").values())

    out = tmp_path / "killed"
    parts_dir = str(out) + "_text_document.parts"
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(inp),
           "--output-prefix", str(out), "--workers", "2", *args]
    kills = 0
    for wait_parts in (1, 8, 20):  # kill early, in the middle, late; each run resumes the last
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = [f for f in os.listdir(parts_dir) if f.endswith(".stats.json")] if os.path.isdir(parts_dir) else []
            if len(done) >= wait_parts:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the run finished before it could be killed"
    assert os.path.isdir(parts_dir) or os.path.exists(str(out) + "_text_document.bin")
    # a half-written output left behind by a kill during the final merge is replaced, not trusted
    if os.path.isdir(parts_dir):
        with open(str(out) + "_text_document.tmp.bin", "wb") as f:
            f.write(b"garbage")
    rc = subprocess.run(cmd, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    assert "resumed run" in rc.stderr
    assert list(file_bytes(str(out) + "_text_document").values()) == want
    assert not os.path.exists(parts_dir)


def test_resume_with_other_arguments_is_refused(corpus_dir, sp_model, tmp_path):
    out = tmp_path / "o"
    parts = str(out) + "_text_document.parts"
    os.makedirs(parts)
    with open(os.path.join(parts, "manifest.json"), "w") as f:
        json.dump({"something": "else"}, f)
    with pytest.raises(SystemExit, match="other arguments"):
        _run(corpus_dir / "raw.jsonl", out, sp_model)
    assert _run(corpus_dir / "raw.jsonl", out, sp_model, "--overwrite") == 0
    with pytest.raises(SystemExit, match="already exist"):
        _run(corpus_dir / "raw.jsonl", out, sp_model)


BAD_LINES = [
    (b'{"text": "fine one"}\n{"text": \n', 2, "malformed JSON"),
    (b'{"text": "ok"}\n{"body": "x"}\n', 2, "needs 'chunks'"),
    (b'{"text": "ok"}\n{"text": "bad \xff byte"}\n', 2, "invalid UTF-8"),
    (b'{"text": "ok"}\n\n{"text": "  "}\n', 3, "empty document"),
    (b'{"text": "ok"}\n{"chunks": [{"text": "x", "tags": [["topic", "a<|ann|>"]]}]}\n', 2, "delimiter"),
    (b'{"text": "ok"}\n{"chunks": [{"text": "x", "tags": [["topic", "a\\nb"]]}]}\n', 2, "newline"),
    (b'{"text": "ok"}\n{"text": "' + b"word " * 400 + b'"}\n', 2, "more than --max-chunk-tokens"),
]


@pytest.mark.parametrize("content,line,needle", BAD_LINES)
def test_bad_input_names_file_and_line(tmp_path, sp_model, capsys, content, line, needle):
    inp = tmp_path / "bad.jsonl"
    inp.write_bytes(content)
    out = tmp_path / "o"
    rc = _run(inp, out, sp_model, "--max-chunk-tokens", "100")
    err = capsys.readouterr().err
    assert rc == 1 and f"{inp}:{line}" in err and needle in err
    assert not os.path.exists(str(out) + "_text_document.bin")
    rc = _run(inp, out, sp_model, "--max-chunk-tokens", "100", "--skip-bad-documents", "--overwrite")
    assert rc == 0
    assert len(IndexedDataset(str(out) + "_text_document")) == 1  # each case has one good document


def test_parts_read_by_position_match_streamed_gzip(corpus_dir, sp_model, tmp_path, capsys):
    """Workers read a plain file's parts by byte range; a .gz input is streamed by the driver. Blank lines, CRLF
    endings, a last line without newline and parts that end on a blank line must give the same dataset, and a
    bad line must be named by its line number in the file either way."""
    import gzip

    lines = open(corpus_dir / "annotated.jsonl", "rb").read().splitlines(keepends=True)[:10]
    lines[2] = lines[2].replace(b"\n", b"\r\n")
    lines[4:4] = [b"\n", b"  \n"]  # a part of 3 lines ends on the blank line
    data = b"".join(lines).rstrip(b"\n")  # no newline at the end
    plain, packed = tmp_path / "in.jsonl", tmp_path / "in.jsonl.gz"
    plain.write_bytes(data)
    packed.write_bytes(gzip.compress(data))
    for inp, out in ((plain, "p"), (packed, "g")):
        assert _run(inp, tmp_path / out, sp_model, "--append-eod", "--docs-per-part", "3", "--workers", "2") == 0
    assert (list(file_bytes(str(tmp_path / "p_text_document")).values())
            == list(file_bytes(str(tmp_path / "g_text_document")).values()))
    assert len(IndexedDataset(str(tmp_path / "p_text_document"))) == 10
    bad = data.replace(lines[11].rstrip(b"\n"), b'{"chunks": 7}')  # line 12: the last, without a newline
    for name in ("bad.jsonl", "bad.jsonl.gz"):
        (tmp_path / name).write_bytes(gzip.compress(bad) if name.endswith(".gz") else bad)
        assert _run(tmp_path / name, tmp_path / "b", sp_model, "--docs-per-part", "3", "--overwrite") == 1
        assert f"{tmp_path / name}:12" in capsys.readouterr().err


def test_failed_run_keeps_existing_output(tmp_path, sp_model):
    good = tmp_path / "good.jsonl"
    good.write_bytes(b'{"text": "hello\\n\\nworld"}\n')
    out = tmp_path / "o"
    assert _run(good, out, sp_model) == 0
    before = file_bytes(str(out) + "_text_document")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "x"}\n{oops\n')
    assert _run(bad, out, sp_model, "--overwrite") == 1
    assert file_bytes(str(out) + "_text_document") == before


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        preprocess_data.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--input", "--output-prefix", "--tokenizer-type", "--tokenizer-model", "--workers",
                 "--append-eod", "--no-annotations", "--skip-bad-documents", "--max-chunk-tokens",
                 "--docs-per-part", "--overwrite", "--json-keys", "--annotator", "--eod-token"):
        assert flag in text


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_sharded_runs_merge_to_the_unsharded_output(corpus_dir, sp_model, tmp_path, num_shards):
    from megatron_anchor.cli import merge_datasets

    inp = tmp_path / "in.jsonl"
    data = open(corpus_dir / "annotated.jsonl", "rb").read().splitlines(keepends=True)[:60]
    data.insert(10, b"\n")  # blank lines are skipped, wherever a shard boundary falls
    inp.write_bytes(b"".join(data))
    assert _run(inp, tmp_path / "single", sp_model, "--append-eod") == 0
    want = list(file_bytes(str(tmp_path / "single_text_document")).values())
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(num_shards):
        assert _run(inp, shards / "x", sp_model, "--append-eod", "--num-shards", str(num_shards),
                    "--shard-index", str(i), "--docs-per-part", "7") == 0
    names = sorted(os.listdir(shards))
    assert len([n for n in names if n.endswith(".done")]) == (num_shards if num_shards > 1 else 0)
    out = str(tmp_path / "merged_text_document")
    assert merge_datasets.main(["--input", str(shards), "--output-prefix", out]) == 0
    assert list(file_bytes(out).values()) == want


def test_shards_without_a_line_start_write_empty_datasets(corpus_dir, sp_model, tmp_path):
    from megatron_anchor.cli import merge_datasets

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"".join(open(corpus_dir / "annotated.jsonl", "rb").read().splitlines(keepends=True)[:2]))
    assert _run(inp, tmp_path / "single", sp_model) == 0
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(6):  # more shards than lines: most byte ranges hold no line start
        assert _run(inp, shards / "x", sp_model, "--num-shards", "6", "--shard-index", str(i)) == 0
    out = str(tmp_path / "merged_text_document")
    assert merge_datasets.main(["--input", str(shards), "--output-prefix", out]) == 0
    assert list(file_bytes(out).values()) == list(file_bytes(str(tmp_path / "single_text_document")).values())


def test_shard_rerun_skips_complete_and_redoes_half_written(corpus_dir, sp_model, tmp_path, caplog):
    import logging

    inp = corpus_dir / "annotated.jsonl"
    args = ("--num-shards", "3", "--shard-index", "1", "--docs-per-part", "20")
    assert _run(inp, tmp_path / "x", sp_model, *args) == 0
    prefix = str(tmp_path / "x_text_document.shard00001-of-00003")
    before = file_bytes(prefix)
    caplog.set_level(logging.INFO)
    assert _run(inp, tmp_path / "x", sp_model, *args) == 0
    assert "skipping this shard" in caplog.text
    # half-written: outputs without the marker (killed while publishing) -> the rerun redoes the shard
    os.remove(prefix + ".done")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    assert _run(inp, tmp_path / "x", sp_model, *args) == 0
    assert file_bytes(prefix) == before and os.path.isfile(prefix + ".done")
    with pytest.raises(SystemExit, match="shard-index"):
        _run(inp, tmp_path / "x", sp_model, "--num-shards", "3", "--shard-index", "3")


def test_shard_errors_name_the_global_line(tmp_path, sp_model, capsys):
    inp = tmp_path / "bad.jsonl"
    lines = [b'{"text": "document %d"}\n' % i for i in range(30)]
    lines[23] = b"{broken\n"
    inp.write_bytes(b"".join(lines))
    rcs = [_run(inp, tmp_path / "o", sp_model, "--num-shards", "4", "--shard-index", str(i)) for i in range(4)]
    assert rcs.count(1) == 1
    assert f"{inp}:24" in capsys.readouterr().err


def test_line_range_head_keeps_whole_lines(tmp_path):
    """The identity check's sample is read as the first whole lines holding at least the sample's bytes."""
    from megatron_anchor.data.partition import LineRange

    path = tmp_path / "in.jsonl"
    path.write_bytes(b"aaaa\nbbbbbbbb\ncc\n")
    whole = LineRange(str(path), 0, 17, 1)
    assert [line for _, line in whole.head(6).lines()] == [b"aaaa\n", b"bbbbbbbb\n"]
    assert whole.head(5).lines() == [(1, b"aaaa\n")] and whole.head(100) == whole
    later = LineRange(str(path), 5, 17, 2)
    assert later.head(1).lines() == [(2, b"bbbbbbbb\n")]
