"""Checkpoint -> Hugging Face folder: config.json, model.safetensors, generation_config.json and the tokenizer
files, loadable by transformers, lm-evaluation-harness and vLLM.

The layout follows the run's architecture: Llama, Qwen2 or Qwen3 (:mod:`~megatron_anchor.export.hf_llama`) for
RoPE/RMSNorm/SwiGLU runs (Qwen2 with q/k/v biases only, Qwen3 with q/k norms), GPT-2 (:mod:`~megatron_anchor.export.hf_gpt2`) for learned-position/LayerNorm/GeLU runs; anything
else is refused with the flags each layout would need. The folder is written under a temporary name and renamed
when complete. Memory: one float32 copy of the weights (plus megatron's while the checkpoint is read).

``--overwrite`` replaces only what an earlier export wrote: a folder holding :data:`MARKER`, or nothing but the
files an export writes (exports older than the marker). Any other folder, the current folder or one of its
parents, and a folder that holds or lies inside the checkpoint are refused before anything is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

from megatron_anchor.export.hf_gpt2 import gpt2_config, gpt2_problems
from megatron_anchor.export.hf_llama import (llama_config, llama_problems, qwen2_config, qwen2_problems,
                                             qwen3_config, qwen3_problems)
from megatron_anchor.inference.gpt2_adapter import gpt2_state_dict
from megatron_anchor.inference.model import DecoderLM, ModelSpec
from megatron_anchor.outputs import atomic_folder


class ExportError(ValueError):
    """The checkpoint cannot be written as a Hugging Face folder."""


@dataclass(frozen=True)
class Layout:
    """One Hugging Face architecture the exporter writes."""

    name: str
    problems: Callable[[ModelSpec], List[str]]
    """Flags missing for this layout (empty: the spec fits)."""
    config: Callable[..., Dict]
    """(spec, eos id, extra) -> config.json fields."""
    state_dict: Callable[[DecoderLM], Dict]
    """The decoder's weights under this layout's names."""


LAYOUTS = (
    Layout("llama", llama_problems, llama_config, lambda m: m.hf_state_dict()),
    Layout("qwen2", qwen2_problems, qwen2_config, lambda m: m.hf_state_dict()),
    Layout("qwen3", qwen3_problems, qwen3_config, lambda m: m.hf_state_dict()),
    Layout("gpt2", gpt2_problems, gpt2_config, gpt2_state_dict),
)
"""Tried in order; the first that fits the run is written."""


def choose_layout(spec: ModelSpec) -> Layout:
    """The first layout of :data:`LAYOUTS` that expresses ``spec`` exactly; ExportError lists what each needs."""
    reasons = []
    for layout in LAYOUTS:
        problems = layout.problems(spec)
        if not problems:
            return layout
        reasons.append(f"{layout.name}: " + ", ".join(problems))
    raise ExportError("the model fits no exportable architecture; train with the flags of one of them:\n  "
                      + "\n  ".join(reasons))


MARKER = "megatron_anchor_export.json"
"""Written into every exported folder: what ``--overwrite`` recognises as replaceable."""
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", MARKER})
"""Every file an export writes (a folder of only these is an earlier export, with or without the marker)."""


def check_output_folder(out_dir: str, overwrite: bool, load: Optional[str] = None) -> None:
    """Refuse an output folder the export must not replace (see the module docstring); ExportError says why."""
    real = os.path.realpath(out_dir)
    if os.path.isfile(real):
        raise ExportError(f"--output {out_dir} is a file; give a folder")
    if real == os.path.realpath(os.getcwd()) or os.getcwd().startswith(real.rstrip(os.sep) + os.sep) \
            or real == os.sep:
        raise ExportError(f"--output {out_dir} is the current folder or one above it; give a new folder")
    if load:
        from megatron_anchor.outputs import inside

        if inside(out_dir, load) or inside(load, out_dir):
            raise ExportError(f"--output {out_dir} and the checkpoint --load {load} overlap; give a separate folder")
    entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    if not entries:
        return
    if not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    foreign = sorted(set(entries) - EXPORT_FILES)
    if MARKER not in entries and foreign:
        raise ExportError(f"--overwrite replaces only an earlier export, and {out_dir} holds other files "
                          f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); give a new folder or "
                          "empty this one yourself")


def save_folder(model: DecoderLM, tokenizer, tokenizer_type: str, out_dir: str, check_texts: Sequence[str] = (),
                extra: Optional[Dict] = None, overwrite: bool = False) -> List[str]:
    """Write the model and tokenizer into ``out_dir`` (via a temporary folder beside it, swapped in when complete;
    see :func:`check_output_folder` for what may be replaced); returns the written file names."""
    from safetensors.torch import save_file

    from megatron_anchor.export.tokenizer import write_tokenizer

    layout = choose_layout(model.spec)
    config = layout.config(model.spec, tokenizer.eod, extra)
    check_output_folder(out_dir, overwrite)
    # A fresh, uniquely named folder, swapped in when complete: nothing that already exists is removed on the way.
    with atomic_folder(out_dir) as tmp:
        save_file(layout.state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": tokenizer.eod, "do_sample": True, "temperature": 1.0}, f, indent=2)
        files = ["config.json", "generation_config.json", "model.safetensors"]
        files += write_tokenizer(tokenizer, tokenizer_type, tmp, check_texts)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump({"written_by": "megatron-anchor tools/export_hf.py", "files": files,
                       "source_checkpoint": (extra or {}).get("source_checkpoint")}, f, indent=2)
    return files + [MARKER]


def export_checkpoint(model_args: Sequence[str], out_dir: str, load: Optional[str] = None,
                      iteration: Optional[int] = None, check_texts: Sequence[str] = (),
                      gelu_approximation: str = "none", overwrite: bool = False,
                      allow_missing_record: bool = False) -> Dict:
    """Read a checkpoint (any TP/PP layout, the trainer's model flags) and write the folder; returns a summary.

    ``gelu_approximation``: "tanh" for GeLU runs trained with megatron's fused bias-GeLU kernel or Transformer
    Engine (both compute the tanh approximation), "none" for the erf GeLU of megatron's unfused MLP (CPU runs).
    """
    from megatron_anchor.inference.checkpoint import checkpoint_config, load_decoder

    check_output_folder(out_dir, overwrite, load)  # before anything is read: fail in seconds
    cfg, load = checkpoint_config(model_args, load)
    check_output_folder(out_dir, overwrite, load)  # the flags' --load too, when ``load`` was not given
    layout = choose_layout(replace(ModelSpec.from_anchor_config(cfg, 0), gelu_approximation=gelu_approximation))
    model, tok, loaded = load_decoder(cfg, load, iteration, gelu_approximation=gelu_approximation,
                                      allow_missing_record=allow_missing_record)
    files = save_folder(model, tok, cfg.data.tokenizer_type, out_dir, check_texts,
                        extra={"source_checkpoint": os.path.abspath(loaded.path),
                               "saved_layout": loaded.saved_layout, "tokenizer_vocab_size": tok.vocab_size},
                        overwrite=overwrite)
    return {"output": out_dir, "architecture": layout.name, "files": files, "checkpoint": loaded.path,
            "saved_layout": loaded.saved_layout, "vocab_size": model.spec.vocab_size,
            "tokenizer_vocab_size": tok.vocab_size}
