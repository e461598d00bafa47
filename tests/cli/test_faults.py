"""Fault injection: a table of bad inputs and faults run through every tool (megatron_anchor.cli, pretrain_anchor.py).

Each case asserts the reliability contract: the tool exits 1 or 2 (the status its docstring gives for bad input
or bad flags) with a message that names the flag or the file, prints no traceback, finishes within its time
limit, and leaves its work folder exactly as it was (nothing written, nothing changed), except for files a case
lists as the resumable state a rerun picks up. Cases call ``main(argv)`` in this process (fast: one import per
tool); the process boundary is exercised separately where it is the point (Ctrl-C).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from tests.paths import REPO

CASE_TIMEOUT_S = 120


class CaseTimeout(BaseException):
    """Raised by the alarm: a BaseException, so no ``except Exception`` in a tool can swallow it."""


@contextmanager
def time_limit(seconds: float):
    def _alarm(signum, frame):
        raise CaseTimeout(f"no result after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Env:
    """Paths a case's arguments refer to; ``work`` is the case's own folder (checked unchanged afterwards)."""

    work: str
    raw: str
    sp_model: str
    hf_tokenizer: str
    dataset: Optional[str] = None
    checkpoint: Optional[str] = None
    model_flags: Sequence[str] = ()

    def __call__(self, name: str) -> str:
        return os.path.join(self.work, name)


@dataclass
class Case:
    id: str
    tool: str
    """The tool: a module of ``megatron_anchor.cli`` (``annotate``), or ``pretrain_anchor``."""
    argv: Callable[[Env], List[str]]
    code: int
    """Expected exit status: 2 for a bad flag value (argparse and the tools' usage errors), 1 or 2 for bad input
    as the tool's docstring says."""
    says: Tuple[str, ...]
    """Texts the message must contain (the flag or the file it names); ``{work}`` is the case folder."""
    setup: Optional[Callable[[Env], None]] = None
    needs: Tuple[str, ...] = ()
    """Shared fixtures the case needs: ``dataset``, ``checkpoint``."""
    may_leave: Tuple[str, ...] = ()
    """Glob patterns (relative to ``work``) of files a failed run may leave for a rerun to resume from."""
    chdir: bool = False
    """Run inside ``work`` (cases about the current folder)."""


# -- inputs the cases build ------------------------------------------------------------------------------------


def _write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _bad_line(env: Env) -> None:
    with open(env.raw, encoding="utf-8") as f:
        lines = f.readlines()
    lines.insert(3, "{not json\n")
    _write(env("bad.jsonl"), "".join(lines))


def _truncated_gz(env: Env) -> None:
    with open(env.raw, "rb") as f:
        data = gzip.compress(f.read() * 4)
    with open(env("corpus.jsonl.gz"), "wb") as f:
        f.write(data[: len(data) // 2])


def _copy_checkpoint(env: Env) -> str:
    dst = env("ckpt")
    shutil.copytree(env.checkpoint, dst)
    env.checkpoint = dst
    return dst


def _latest(ckpt: str) -> str:
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        return os.path.join(ckpt, f"iter_{int(f.read()):07d}")


def _truncate_distcp(env: Env) -> None:
    it = _latest(_copy_checkpoint(env))
    shard = sorted(n for n in os.listdir(it) if n.endswith(".distcp"))[0]
    with open(os.path.join(it, shard), "r+b") as f:
        f.truncate(100)


def _drop_record(env: Env) -> None:
    os.remove(os.path.join(_copy_checkpoint(env), "tokenizer_record.json"))


def _corrupt_run_config(text: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        _write(os.path.join(_copy_checkpoint(env), "run_config.yaml"), text)
    return setup


def _prompts(env: Env) -> None:
    _write(env("prompts.jsonl"), json.dumps({"prompt": "Tell me about bread."}) + "\n")


def _teacher(env: Env) -> None:
    from megatron_anchor.annotation.default_annotator import annotate_document
    from megatron_anchor.annotation.schema import parse_line

    with open(env.raw, "rb") as src, open(env("teacher.jsonl"), "w", encoding="utf-8") as dst:
        for i, line in enumerate(src, 1):
            dst.write(annotate_document(parse_line(line, f"raw:{i}")).to_jsonl() + "\n")
            if i == 60:
                dst.write("[1, 2]\n")  # a line that is not a document


def _sft_overlong(env: Env) -> None:
    rows = [{"prompt": "Tell me a story.", "response": "Once upon a time " * 40} for _ in range(5)]
    _write(env("sft.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def _progress_garbage(env: Env) -> None:
    _write(env("out.jsonl"), "")
    _write(env("out.jsonl.progress.json"), "{truncated")


def _file(name: str, text: str = "keep me\n") -> Callable[[Env], None]:
    return lambda env: _write(env(name), text)


def _folder_with_files(env: Env) -> None:
    os.makedirs(env("mine"))
    _write(env("mine/notes.txt"), "mine\n")


def _sft_flags(env: Env) -> List[str]:
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", env.sp_model, "--no-progress"]


def _pre(env: Env) -> List[str]:
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", env.sp_model, "--no-progress"]


def _mock() -> List[str]:
    return ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "300", "--train-iters", "2"]


def _gen(env: Env, *extra: str) -> List[str]:
    return ["--prompts", env("prompts.jsonl"), "--output", env("samples.jsonl"), *extra]


CASES = [
    # ---- tools/train_tokenizer.py
    Case("tokenizer-vocab-0", "train_tokenizer",
         lambda e: ["--input", e.raw, "--output-prefix", e("tok"), "--vocab-size", "0"], 2, ("--vocab-size",)),
    Case("tokenizer-vocab-1e9", "train_tokenizer",
         lambda e: ["--input", e.raw, "--output-prefix", e("tok"), "--vocab-size", "1000000000", "--type", "hf"],
         2, ("--vocab-size",)),
    Case("tokenizer-empty-corpus-hf", "train_tokenizer",
         lambda e: ["--input", e("empty.jsonl"), "--output-prefix", e("tok"), "--type", "hf"], 1,
         ("empty.jsonl", "no text"), setup=_file("empty.jsonl", "")),
    Case("tokenizer-empty-corpus-sp", "train_tokenizer",
         lambda e: ["--input", e("empty.jsonl"), "--output-prefix", e("tok")], 1, ("no text",),
         setup=_file("empty.jsonl", "\n")),
    Case("tokenizer-input-is-folder", "train_tokenizer",
         lambda e: ["--input", e.work, "--output-prefix", e("tok")], 1, ("is a folder",)),
    Case("tokenizer-bad-line", "train_tokenizer",
         lambda e: ["--input", e("bad.jsonl"), "--output-prefix", e("tok")], 1, ("bad.jsonl:4",), setup=_bad_line),
    Case("tokenizer-output-is-input", "train_tokenizer",
         lambda e: ["--input", e("c.model"), "--output-prefix", e("c")], 1, ("same file", "--input"),
         setup=lambda e: shutil.copy(e.raw, e("c.model"))),
    Case("tokenizer-vocab-below-corpus", "train_tokenizer",
         lambda e: ["--input", e.raw, "--output-prefix", e("tok"), "--vocab-size", "260"], 1, ("--vocab-size 260",)),
    # ---- tools/inspect_dataset.py
    Case("inspect-missing", "inspect_dataset", lambda e: ["--input", e("nothing_text_document")], 1,
         ("nothing_text_document",)),
    Case("inspect-negative-document", "inspect_dataset",
         lambda e: ["--input", e.dataset, "--document", "-1"], 2, ("--document",), needs=("dataset",)),
    Case("inspect-document-out-of-range", "inspect_dataset",
         lambda e: ["--input", e.dataset, "--document", "99999"], 1, ("99999",), needs=("dataset",)),
    Case("inspect-other-tokenizer", "inspect_dataset",
         lambda e: ["--input", e.dataset, "--document", "0", "--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", e.hf_tokenizer], 1, ("another tokenizer",), needs=("dataset",)),
    # ---- tools/merge_datasets.py
    Case("merge-output-is-input", "merge_datasets",
         lambda e: ["--input", e("d_text_document"), "--output-prefix", e("d_text_document"), "--overwrite"], 1,
         ("same file",), needs=("dataset",), setup=lambda e: _copy_dataset(e, "d_text_document")),
    Case("merge-missing-input", "merge_datasets",
         lambda e: ["--input", e("none_text_document"), "--output-prefix", e("m")], 1, ("none_text_document",)),
    Case("merge-truncated-bin", "merge_datasets",
         lambda e: ["--input", e("d_text_document"), "--output-prefix", e("m")], 1, ("d_text_document.bin",),
         needs=("dataset",), setup=lambda e: _copy_dataset(e, "d_text_document", truncate=True)),
    # ---- tools/preprocess_data.py
    Case("preprocess-input-is-folder", "preprocess_data",
         lambda e: ["--input", e.work, "--output-prefix", e("o"), *_pre(e)], 1, ("is a folder",)),
    Case("preprocess-workers-0", "preprocess_data",
         lambda e: ["--input", e.raw, "--output-prefix", e("o"), "--workers", "0", *_pre(e)], 2, ("--workers",)),
    Case("preprocess-bad-line", "preprocess_data",
         lambda e: ["--input", e("bad.jsonl"), "--output-prefix", e("o"), *_pre(e)], 1, ("bad.jsonl:4",),
         setup=_bad_line, may_leave=("o_text_document.parts/*",)),
    Case("preprocess-truncated-gz", "preprocess_data",
         lambda e: ["--input", e("corpus.jsonl.gz"), "--output-prefix", e("o"), "--docs-per-part", "100000", *_pre(e)],
         1, ("corpus.jsonl.gz:", "truncated"), setup=_truncated_gz, may_leave=("o_text_document.parts/*",)),
    Case("preprocess-output-under-a-file", "preprocess_data",
         lambda e: ["--input", e.raw, "--output-prefix", e("afile/o"), *_pre(e)], 1, ("afile",),
         setup=_file("afile")),
    Case("preprocess-budget-negative", "preprocess_data",
         lambda e: ["--input", e.raw, "--output-prefix", e("o"), "--max-tags-per-chunk", "-1", *_pre(e)], 2,
         ("--max-tags-per-chunk",)),
    # ---- tools/preprocess_sft.py
    Case("sft-every-sample-overlong", "preprocess_sft",
         lambda e: ["--input", e("sft.jsonl"), "--output-prefix", e("s"), "--seq-length", "16", *_sft_flags(e)], 1,
         ("5 dropped", "--seq-length"), setup=_sft_overlong, may_leave=("s_text_document.parts/*",)),
    Case("sft-seq-length-negative", "preprocess_sft",
         lambda e: ["--input", e("sft.jsonl"), "--output-prefix", e("s"), "--seq-length", "-1", *_sft_flags(e)], 2,
         ("--seq-length",), setup=_sft_overlong),
    Case("sft-format-fraction-2", "preprocess_sft",
         lambda e: ["--input", e("sft.jsonl"), "--output-prefix", e("s"), "--format-stability-fraction", "2",
                    *_sft_flags(e)], 2, ("--format-stability-fraction",), setup=_sft_overlong),
    Case("sft-bad-yaml-template", "preprocess_sft",
         lambda e: ["--input", e("sft.jsonl"), "--output-prefix", e("s"), "--chat-template", e("t.yaml"),
                    *_sft_flags(e)], 2, ("t.yaml",), setup=lambda e: (_sft_overlong(e), _file("t.yaml", "a: [1,\n")(e))),
    Case("sft-missing-input", "preprocess_sft",
         lambda e: ["--input", e("none.jsonl"), "--output-prefix", e("s"), *_sft_flags(e)], 1, ("none.jsonl",)),
    # ---- tools/annotate.py
    Case("annotate-output-is-input", "annotate",
         lambda e: ["--input", e("in.jsonl"), "--output", e("in.jsonl"), "--overwrite", "--no-progress"], 1,
         ("same file",), setup=lambda e: shutil.copy(e.raw, e("in.jsonl"))),
    Case("annotate-concurrency-0", "annotate",
         lambda e: ["--input", e.raw, "--output", e("o.jsonl"), "--annotator", "vllm", "--url", "http://127.0.0.1:9",
                    "--concurrency", "0"], 2, ("--concurrency",)),
    Case("annotate-window-negative", "annotate",
         lambda e: ["--input", e.raw, "--output", e("o.jsonl"), "--window", "-1"], 2, ("--window",)),
    Case("annotate-corrupt-progress", "annotate",
         lambda e: ["--input", e.raw, "--output", e("out.jsonl"), "--no-progress"], 1, ("out.jsonl.progress.json",),
         setup=_progress_garbage),
    Case("annotate-input-is-folder", "annotate",
         lambda e: ["--input", e.work, "--output", e("o.jsonl")], 1, ("is a folder",)),
    # ---- tools/distill_annotator.py
    Case("distill-max-classes-0", "distill_annotator",
         lambda e: ["--teacher", e.raw, "--output", e("t.npz"), "--max-classes", "0"], 2, ("--max-classes",)),
    Case("distill-test-fraction-1", "distill_annotator",
         lambda e: ["--teacher", e.raw, "--output", e("t.npz"), "--test-fraction", "1"], 2, ("--test-fraction",)),
    Case("distill-fractions-leave-nothing", "distill_annotator",
         lambda e: ["--teacher", e("teacher.jsonl"), "--output", e("t.npz"), "--test-fraction", "0.5",
                    "--validation-fraction", "0.5", "--skip-bad-documents", "--quiet"], 1,
         ("--test-fraction 0.5",), setup=_teacher),
    Case("distill-bad-teacher-line", "distill_annotator",
         lambda e: ["--teacher", e("teacher.jsonl"), "--output", e("t.npz"), "--quiet"], 1,
         ("teacher.jsonl:61", "--skip-bad-documents"), setup=_teacher),
    Case("distill-output-is-teacher", "distill_annotator",
         lambda e: ["--teacher", e("teacher.jsonl"), "--output", e("teacher.jsonl"), "--overwrite"], 1,
         ("same file",), setup=_teacher),
    Case("distill-report-is-teacher", "distill_annotator",
         lambda e: ["--teacher", e("teacher.jsonl"), "--output", e("t.npz"), "--report", e("teacher.jsonl")], 1,
         ("--report",), setup=_teacher),
    # ---- tools/generate.py
    Case("generate-temperature-nan", "generate", lambda e: _gen(e, "--load", e.work, "--temperature", "nan"),
         2, ("--temperature",), setup=_prompts),
    Case("generate-n-0", "generate", lambda e: _gen(e, "--load", e.work, "--n", "0"), 2, ("--n",),
         setup=_prompts),
    Case("generate-top-p-0", "generate", lambda e: _gen(e, "--load", e.work, "--top-p", "0"), 2,
         ("--top-p",), setup=_prompts),
    Case("generate-missing-load", "generate", lambda e: _gen(e, "--load", e("nope")), 2,
         ("nope", "does not exist"), setup=_prompts),
    Case("generate-output-is-prompts", "generate",
         lambda e: ["--prompts", e("prompts.jsonl"), "--output", e("prompts.jsonl"), "--load", e.work], 2,
         ("same file",), setup=_prompts),
    Case("generate-prompts-is-folder", "generate",
         lambda e: ["--prompts", e.work, "--output", e("s.jsonl"), "--load", e.work], 2, ("is a folder",)),
    Case("generate-bad-yaml-template", "generate",
         lambda e: _gen(e, "--load", e.work, "--chat-template", e("t.yaml")), 2, ("t.yaml",),
         setup=lambda e: (_prompts(e), _file("t.yaml", "user_prefix: [\n")(e))),
    Case("generate-no-tokenizer-record", "generate", lambda e: _gen(e, "--load", e.checkpoint), 2,
         ("tokenizer_record.json", "--allow-missing-tokenizer-record"),
         setup=lambda e: (_prompts(e), _drop_record(e)), needs=("checkpoint",)),
    Case("generate-truncated-distcp", "generate", lambda e: _gen(e, "--load", e.checkpoint), 2,
         (".distcp", "truncated"), setup=lambda e: (_prompts(e), _truncate_distcp(e)), needs=("checkpoint",)),
    Case("generate-corrupt-run-config", "generate", lambda e: _gen(e, "--load", e.checkpoint), 2,
         ("run_config.yaml", "not valid YAML"), setup=lambda e: (_prompts(e), _corrupt_run_config("model: [\n")(e)),
         needs=("checkpoint",)),
    Case("generate-run-config-integer-key", "generate", lambda e: _gen(e, "--load", e.checkpoint), 2,
         ("run_config.yaml", "setting names must be text"),
         setup=lambda e: (_prompts(e), _corrupt_run_config("1: 2\n")(e)), needs=("checkpoint",)),
    # ---- tools/import_hf.py
    Case("import-not-a-model-folder", "import_hf", lambda e: ["--input", e.work, "--output", e("ck")], 2,
         ("config.json",), setup=_file("notes.txt")),
    Case("import-unknown-family", "import_hf", lambda e: ["--input", e.work, "--output", e("ck")], 2,
         ("config.json", "family"), setup=_file("config.json", '{"model_type": "bert"}\n')),
    Case("import-seq-length-0", "import_hf",
         lambda e: ["--input", e.work, "--output", e("ck"), "--seq-length", "0"], 2, ("--seq-length",)),
    Case("import-missing-gguf", "import_hf", lambda e: ["--input", e("model.gguf"), "--output", e("ck")], 2,
         ("model.gguf", "not found")),
    # ---- tools/evaluate_midtraining.py
    Case("midtrain-eval-missing-heldout", "evaluate_midtraining",
         lambda e: ["--base", e.work, "--model", e.work, "--heldout", e("nope.jsonl")], 2, ("--heldout", "nope.jsonl")),
    Case("midtrain-eval-bad-heldout-line", "evaluate_midtraining",
         lambda e: ["--base", e.work, "--model", e.work, "--heldout", e("h.jsonl")], 2, ("h.jsonl:2",),
         setup=_file("h.jsonl", '{"text": "a"}\n{"text": \n')),
    Case("midtrain-eval-n-0", "evaluate_midtraining",
         lambda e: ["--base", e.work, "--model", e.work, "--heldout", e("h.jsonl"), "--n", "0"], 2, ("--n",),
         setup=_file("h.jsonl", '{"text": "a"}\n')),
    Case("midtrain-eval-output-is-heldout", "evaluate_midtraining",
         lambda e: ["--base", e.work, "--model", e.work, "--heldout", e("h.jsonl"), "--output", e("h.jsonl")], 2,
         ("same file",), setup=_file("h.jsonl", '{"text": "a"}\n')),
    Case("midtrain-eval-missing-base", "evaluate_midtraining",
         lambda e: ["--base", e("nope"), "--model", e.work, "--heldout", e("h.jsonl")], 2, ("--base", "nope"),
         setup=_file("h.jsonl", '{"text": "a"}\n')),
    Case("midtrain-eval-missing-annotated", "evaluate_midtraining",
         lambda e: ["--base", e.work, "--model", e.work, "--heldout", e("h.jsonl"), "--annotated", e("nope.jsonl")],
         2, ("--annotated", "nope.jsonl"), setup=_file("h.jsonl", '{"text": "a\\n\\nb"}\n')),
    Case("midtrain-eval-annotation-cap-0", "evaluate_midtraining",
         lambda e: ["--base", e.work, "--model", e.work, "--heldout", e("h.jsonl"), "--max-annotation-tokens", "0"],
         2, ("--max-annotation-tokens",), setup=_file("h.jsonl", '{"text": "a"}\n')),
    Case("midtrain-eval-no-chunk-boundary", "evaluate_midtraining",
         lambda e: ["--base", e.work, "--model", e.work, "--heldout", e("h.jsonl")], 2,
         ("--heldout", "chunk boundary"), setup=_file("h.jsonl", '{"text": "one paragraph"}\n')),
    # ---- tools/export_hf.py
    Case("export-over-current-folder", "export_hf",
         lambda e: ["--load", e("ck"), "--output", ".", "--overwrite"], 2, ("current folder",),
         setup=_file("keep.txt"), chdir=True),
    Case("export-over-foreign-folder", "export_hf",
         lambda e: ["--load", e("ck"), "--output", e("mine"), "--overwrite"], 2, ("notes.txt",),
         setup=_folder_with_files),
    Case("export-into-checkpoint", "export_hf",
         lambda e: ["--load", e("ck"), "--output", e("ck/hf")], 2, ("overlap",),
         setup=lambda e: os.makedirs(e("ck"))),
    Case("export-iteration-negative", "export_hf", lambda e: ["--load", e.work, "--output", e("hf"),
                                                                    "--iteration", "-1"], 2, ("--iteration",)),
    Case("export-missing-checkpoint", "export_hf", lambda e: ["--load", e("nope"), "--output", e("hf")], 2,
         ("nope",)),
    Case("export-bad-check-texts", "export_hf",
         lambda e: ["--load", e("ck"), "--output", e("hf"), "--check-texts", e("bad.jsonl")], 2,
         ("bad.jsonl:4",), setup=_bad_line),
    # ---- tools/evaluate_diversity.py
    Case("diversity-n-0", "evaluate_diversity",
         lambda e: ["--prompts", e.raw, "--model", "a=x", "--output-prefix", e("d"), "--n", "0"], 2, ("--n",)),
    Case("diversity-duplicate-model", "evaluate_diversity",
         lambda e: ["--prompts", e.raw, "--model", "a=x", "--model", "a=y", "--output-prefix", e("d"),
                    "--similarity-threshold", "0.4"], 2, ("--model a is given twice",)),
    Case("diversity-threshold-and-calibration", "evaluate_diversity",
         lambda e: ["--prompts", e.raw, "--model", "a=x", "--output-prefix", e("d"), "--similarity-threshold", "0.4",
                    "--calibration-pairs", e.raw], 2, ("--calibration-pairs", "not both")),
    Case("diversity-temperature-negative", "evaluate_diversity",
         lambda e: ["--prompts", e.raw, "--model", "a=x", "--output-prefix", e("d"), "--temperatures", "1", "-1"], 2,
         ("--temperatures",)),
    Case("diversity-threshold-out-of-range", "evaluate_diversity",
         lambda e: ["--prompts", e.raw, "--model", "a=x", "--output-prefix", e("d"), "--similarity-threshold", "2"],
         2, ("--similarity-threshold",)),
    Case("diversity-output-is-prompts", "evaluate_diversity",
         lambda e: ["--prompts", e("d.json"), "--model", "a=x", "--output-prefix", e("d"),
                    "--similarity-threshold", "0.4"], 2, ("same file",), setup=_file("d.json", '{"prompt": "x"}\n')),
    # ---- tools/evaluate_ability.py
    Case("ability-demo-questions-0", "evaluate_ability",
         lambda e: ["--model", "a=x", "--demo-task", e("tasks"), "--demo-questions", "0", "--output", e("a.json")], 2,
         ("--demo-questions",)),
    Case("ability-output-under-a-file", "evaluate_ability",
         lambda e: ["--model", "a=x", "--demo-task", e("tasks"), "--output", e("afile/a.json")], 2, ("afile",),
         setup=_file("afile")),
    Case("ability-model-not-exported", "evaluate_ability",
         lambda e: ["--model", "a=" + e.work, "--demo-task", e("tasks"), "--output", e("a.json")], 2,
         ("config.json",)),
    # ---- pretrain_anchor.py
    Case("pretrain-seq-length-0", "pretrain_anchor", lambda e: [*_mock(), "--seq-length", "0"], 2, ("--seq-length",)),
    Case("pretrain-seq-length-negative", "pretrain_anchor", lambda e: [*_mock(), "--seq-length", "-1"], 2,
         ("--seq-length",)),
    Case("pretrain-lr-nan", "pretrain_anchor", lambda e: [*_mock(), "--lr", "nan"], 2, ("--lr",)),
    Case("pretrain-weights-zero", "pretrain_anchor",
         lambda e: ["--data-path", "0", e.dataset, "0", e.dataset, *_pre(e)[:4]], 2, ("--data-path weights",),
         needs=("dataset",)),
    Case("pretrain-weights-negative", "pretrain_anchor",
         lambda e: ["--data-path", "-1", e.dataset, "2", e.dataset, *_pre(e)[:4]], 2, ("--data-path weights",),
         needs=("dataset",)),
    Case("pretrain-unwritable-save", "pretrain_anchor", lambda e: [*_mock(), "--save", e("afile/ck")], 2,
         ("--save", "afile"), setup=_file("afile")),
    Case("pretrain-corrupt-config", "pretrain_anchor", lambda e: ["--config", e("run.yaml"), *_mock()], 2,
         ("run.yaml", "not valid YAML"), setup=_file("run.yaml", "model: {num_layers: [\n")),
    Case("pretrain-config-integer-key", "pretrain_anchor", lambda e: ["--config", e("run.yaml"), *_mock()], 2,
         ("run.yaml", "setting names must be text"), setup=_file("run.yaml", "3: 4\n")),
    Case("pretrain-config-bad-value", "pretrain_anchor", lambda e: ["--config", e("run.yaml"), *_mock()], 2,
         ("--seq-length", "must be >= 1"), setup=_file("run.yaml", "seq_length: 0\n")),
    Case("pretrain-sft-policy-on-pretraining-data", "pretrain_anchor",
         lambda e: ["--data-path", e.dataset, *_pre(e)[:4], "--loss-mask-policy", "sft-anchored", "--split",
                    "100,0,0", "--seq-length", "32"], 2, ("sft-anchored", "pretraining data"), needs=("dataset",)),
    Case("pretrain-truncated-checkpoint", "pretrain_anchor",
         lambda e: ["--data-path", e.dataset, *_pre(e)[:4], *e.model_flags, "--split", "100,0,0", "--load",
                    e.checkpoint], 2, ("--load", ".distcp", "truncated"), setup=_truncate_distcp,
         needs=("dataset", "checkpoint")),
    Case("pretrain-finetune-without-checkpoint", "pretrain_anchor",
         lambda e: [*_mock(), "--finetune", "--load", e("empty")], 2, ("--finetune", "no checkpoint"),
         setup=lambda e: os.makedirs(e("empty"))),
    # ---- tools/annotator_server.py, make_synthetic_corpus.py, run_on_ray.py, ablation_sft.py
    Case("server-port-0", "annotator_server", lambda e: ["--port", "0", "--dry-run"], 2, ("--port",)),
    Case("server-gpu-memory-1.5", "annotator_server",
         lambda e: ["--backend", "gpu", "--gpu-memory-utilization", "1.5", "--dry-run"], 2,
         ("--gpu-memory-utilization",)),
    Case("server-missing-key-file", "annotator_server",
         lambda e: ["--backend", "gpu", "--dry-run", "--api-key-file", e("none.key")], 1, ("none.key",)),
    Case("synthetic-documents-0", "make_synthetic_corpus",
         lambda e: ["--output", e("c.jsonl"), "--documents", "0"], 2, ("--documents",)),
    Case("synthetic-output-is-folder", "make_synthetic_corpus", lambda e: ["--output", e.work], 1,
         ("is a folder",)),
    Case("ray-shards-0", "run_on_ray", lambda e: ["--stage", "annotate", "--num-shards", "0", "--", "x"], 2,
         ("--num-shards",)),
    Case("binding-n-0", "binding_study", lambda e: ["--out", e("b"), "--n", "0", "--report-only"], 2,
         ("--n",)),
    Case("binding-unknown-knob", "binding_study",
         lambda e: ["--out", e("b"), "--variants", "NO_SUCH_KNOB=1", "--report-only"], 2, ("NO_SUCH_KNOB",)),
    Case("ablation-n-1", "ablation_sft", lambda e: ["--out", e("abl"), "--n", "1", "--dry-run"], 2, ("--n",)),
    Case("ablation-pre-iters-0", "ablation_sft", lambda e: ["--out", e("abl"), "--pre-iters", "0"], 2,
         ("--pre-iters",)),
]


def _copy_dataset(env: Env, name: str, truncate: bool = False) -> None:
    for suffix in (".bin", ".idx", "_roles.bin", "_roles.idx", "_tokenizer_record.json"):
        src = env.dataset + suffix
        if os.path.exists(src):
            shutil.copy(src, env(name + suffix))
    if truncate:
        with open(env(name + ".bin"), "r+b") as f:
            f.truncate(os.path.getsize(env(name + ".bin")) // 2)


def snapshot(folder: str) -> Dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def call_main(tool: str, argv: List[str]) -> Tuple[int, str]:
    """``(exit status, message of a SystemExit(str))`` of the tool's ``main(argv)`` (``megatron_anchor.cli.TOOL``;
    ``pretrain_anchor`` is the training entry point at the checkout's root)."""
    module = tool if tool == "pretrain_anchor" else f"megatron_anchor.cli.{tool}"
    main = importlib.import_module(module).main
    try:
        rc = main(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0, ""
        return 1, str(exc.code)  # SystemExit("message"): Python prints it and exits 1
    return (rc if isinstance(rc, int) else 0), ""


@pytest.fixture(scope="module")
def base_env(corpus_dir, sp_model, hf_tokenizer_dir):
    return {"raw": str(corpus_dir / "raw.jsonl"), "sp_model": sp_model, "hf_tokenizer": hf_tokenizer_dir}


# Cases on a checkpoint need the session's trained one (torchrun): integration tests.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.integration) if "checkpoint" in c.needs else c
                                  for c in CASES], ids=[c.id for c in CASES])
def test_fault(case: Case, base_env, request, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    env = Env(str(work), **base_env)
    if "dataset" in case.needs:
        env.dataset = request.getfixturevalue("tiny_dataset")["prefix"]
    if "checkpoint" in case.needs:
        ckpt = request.getfixturevalue("tiny_checkpoint")
        env.checkpoint = ckpt["load"]
        env.model_flags = [f for f in ckpt["args"][4:]]  # the architecture flags (the tokenizer comes from _pre)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ANNOTATOR_API_KEY", raising=False)
    if case.chdir:
        monkeypatch.chdir(work)
    if case.setup:
        case.setup(env)
    argv = case.argv(env)
    before = snapshot(env.work)
    shared_before = snapshot(env.checkpoint) if env.checkpoint and not env.checkpoint.startswith(env.work) else None
    start = time.monotonic()
    try:
        with time_limit(CASE_TIMEOUT_S):
            code, exit_message = call_main(case.tool, argv)
    except CaseTimeout as exc:
        pytest.fail(f"{case.id}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the contract is "no traceback": any escaping exception fails it
        pytest.fail(f"{case.id}: {type(exc).__name__} escaped main(): {exc}")
    out = capsys.readouterr()
    text = out.out + out.err + exit_message
    assert "Traceback" not in text, text
    assert code == case.code, f"{case.id}: exit {code}, expected {case.code}\n{text[-3000:]}"
    for needle in case.says:
        assert needle.format(work=env.work) in text, f"{case.id}: the message does not name {needle!r}:\n{text[-3000:]}"
    after = snapshot(env.work)
    changed = sorted(p for p in before if after.get(p) != before[p])
    created = sorted(p for p in set(after) - set(before) if not any(fnmatch(p, pat) for pat in case.may_leave))
    assert not changed and not created, f"{case.id}: files changed {changed}, written {created}"
    if shared_before is not None:
        assert snapshot(env.checkpoint) == shared_before
    assert time.monotonic() - start < CASE_TIMEOUT_S


def test_every_tool_has_cases():
    """The table covers every tool (megatron_anchor.cli.CONSOLE_SCRIPTS; a new tool needs its bad-input cases here)
    and every tool module under megatron_anchor/cli/ is in that list."""
    from megatron_anchor.cli import CONSOLE_SCRIPTS

    listed = set(CONSOLE_SCRIPTS.values())
    modules = {n[:-3] for n in os.listdir(os.path.join(REPO, "megatron_anchor", "cli"))
               if n.endswith(".py") and n != "__init__.py"}
    assert modules == listed, sorted(modules ^ listed)
    covered = {c.tool for c in CASES}
    assert listed | {"pretrain_anchor"} <= covered, sorted(listed - covered)
    assert len({c.id for c in CASES}) == len(CASES)


# -- process boundaries: Ctrl-C -------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("annotator", ["default", "distilled"])
def test_ctrl_c_stops_annotation_cleanly_and_a_rerun_finishes_it(annotator, tmp_path, corpus_dir):
    """SIGINT reaches an in-process annotator (which never awaits anything itself): the tool exits 130 within
    seconds with one line and no traceback, and rerunning the same command gives a file byte-identical to an
    uninterrupted run."""
    from megatron_anchor.data.synthetic import write_raw_jsonl

    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    corpus = str(tmp_path / "big.jsonl")
    # Large enough that the signal lands mid-run: the embedded annotator tags ~28,000 chunks/s on an idle core, so
    # 6,000 documents could finish between the first progress record and the signal.
    write_raw_jsonl(corpus, 30000, seed=3)
    spec = "default"
    if annotator == "distilled":
        teacher = tmp_path / "teacher.jsonl"
        _teacher(Env(str(tmp_path), str(corpus_dir / "raw.jsonl"), "", ""))
        lines = [ln for ln in teacher.read_text().splitlines() if ln.startswith("{")]
        teacher.write_text("\n".join(lines) + "\n")
        from megatron_anchor.cli import distill_annotator

        assert distill_annotator.main(["--teacher", str(teacher), "--output", str(tmp_path / "t.npz"), "--keys",
                                       "entities", "--quiet"]) == 0
        spec = f"distilled:{tmp_path / 't.npz'}"
    tool = [sys.executable, os.path.join(REPO, "tools", "annotate.py"), "--input", corpus, "--annotator", spec,
            "--no-progress"]
    ref = str(tmp_path / "ref.jsonl")
    assert subprocess.run(tool + ["--output", ref], env=env, capture_output=True, timeout=300).returncode == 0
    out = str(tmp_path / "out.jsonl")
    # A shell running this suite in the background (`cmd &`) starts it with SIGINT ignored, which children inherit
    # and Python then leaves ignored: the tool starts with the default disposition, as from a terminal.
    proc = subprocess.Popen(tool + ["--output", out], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    # The signal lands once the job is writing annotated documents (past its set-up and first checkpoint).
    while not (os.path.exists(out) and os.path.getsize(out) > 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted: make the corpus larger"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert time.monotonic() - sent < 20
    assert "Traceback" not in err and "rerun the same command to resume" in err, err
    rerun = subprocess.run(tool + ["--output", out], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with open(ref, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()
