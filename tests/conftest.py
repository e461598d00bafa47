"""Shared fixtures: a small synthetic corpus, tokenizers trained on it, and a preprocessed dataset.

Everything is built once per test session under pytest's temporary directory, by calling the project's own
tools (``main(argv)``), so the fixtures exercise the same paths a user runs.
"""

import json
import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

from megatron_anchor.data.synthetic import write_raw_jsonl  # noqa: E402

# Fixtures shared across test modules are imported here, and only here: a session fixture imported into several
# test modules is a separate fixture in each (two vLLM servers, two trainings of the same checkpoint).
from tests.annotator_fixtures import fake_server, vllm_server  # noqa: E402,F401
from tests.inference.test_generate_fixtures import (  # noqa: E402,F401
    exported,
    gpt2_checkpoint,
    gpt2_exported,
    gpt2_vllm_server,
    tiny_checkpoint,
    tiny_generator,
)

N_DOCS = 400


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Folder with ``raw.jsonl`` (N_DOCS raw documents) and ``annotated.jsonl`` (the same, annotated)."""
    from megatron_anchor.annotation.default_annotator import annotate_document
    from megatron_anchor.annotation.schema import parse_line

    d = tmp_path_factory.mktemp("corpus")
    write_raw_jsonl(str(d / "raw.jsonl"), N_DOCS, seed=7)
    with open(d / "raw.jsonl", "rb") as src, open(d / "annotated.jsonl", "w", encoding="utf-8") as dst:
        for i, line in enumerate(src, 1):
            doc = annotate_document(parse_line(line, f"raw.jsonl:{i}"))
            dst.write(doc.to_jsonl() + "\n")
    return d


@pytest.fixture(scope="session")
def sp_model(corpus_dir):
    """A SentencePiece model (vocab 512) trained by tools/train_tokenizer.py on the corpus."""
    from megatron_anchor.cli import train_tokenizer

    prefix = str(corpus_dir / "sp")
    assert train_tokenizer.main(["--input", str(corpus_dir / "raw.jsonl"), "--output-prefix", prefix,
                                 "--vocab-size", "512"]) == 0
    return prefix + ".model"


@pytest.fixture(scope="session")
def hf_tokenizer_dir(corpus_dir):
    """A byte-level BPE tokenizer folder (vocab 600) trained by tools/train_tokenizer.py --type hf."""
    from megatron_anchor.cli import train_tokenizer

    out = str(corpus_dir / "hf")
    assert train_tokenizer.main(["--input", str(corpus_dir / "raw.jsonl"), "--output-prefix", out,
                                 "--vocab-size", "600", "--type", "hf"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_dataset(corpus_dir, sp_model):
    """A preprocessed token + role dataset; returns a dict with ``prefix``, ``tokenizer_model``, ``input``."""
    from megatron_anchor.cli import preprocess_data

    out = str(corpus_dir / "data" / "tiny")
    assert preprocess_data.main([
        "--input", str(corpus_dir / "annotated.jsonl"), "--output-prefix", out,
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
        "--append-eod", "--workers", "1", "--no-progress",
    ]) == 0
    return {"prefix": out + "_text_document", "tokenizer_type": "SentencePieceTokenizer",
            "tokenizer_model": sp_model, "input": str(corpus_dir / "annotated.jsonl")}


@pytest.fixture(scope="session")
def tiny_plain_dataset(corpus_dir, sp_model, tiny_dataset):
    """The same documents as ``tiny_dataset`` without annotations (``--no-annotations``): what standard SFT
    replays. Returns its prefix."""
    from megatron_anchor.cli import preprocess_data

    out = str(corpus_dir / "data" / "tiny_plain")
    assert preprocess_data.main([
        "--input", tiny_dataset["input"], "--output-prefix", out, "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", sp_model, "--append-eod", "--workers", "1", "--no-progress", "--no-annotations",
    ]) == 0
    return out + "_text_document"


@pytest.fixture(scope="session")
def sft_data(sp_model, tmp_path_factory):
    """SFT datasets written by tools/preprocess_sft.py from 400 synthetic samples: ``anchored`` (annotation
    before each response) and ``standard`` (``--no-annotations``); values are the dataset prefixes."""
    from tests.data.test_sft_preprocess import write_sft_jsonl
    from megatron_anchor.cli import preprocess_sft

    d = tmp_path_factory.mktemp("sft_train")
    inp = write_sft_jsonl(str(d / "sft.jsonl"), 400, seed=3)
    out = {}
    for name, extra in (("anchored", []), ("standard", ["--no-annotations"])):
        assert preprocess_sft.main(["--input", inp, "--output-prefix", str(d / name), "--tokenizer-type",
                                    "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--seq-length", "128",
                                    "--chat-template", "simple", "--no-progress", *extra]) == 0
        out[name] = str(d / name) + "_text_document"
    return out


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def file_bytes(prefix):
    """The four output files' bytes, for byte-identity checks."""
    out = {}
    for p in (prefix, prefix + "_roles"):
        for ext in (".bin", ".idx"):
            with open(p + ext, "rb") as f:
                out[os.path.basename(p + ext)] = f.read()
    return out


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need a CUDA device; without one they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
