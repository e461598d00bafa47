"""Checkpoint -> Hugging Face folder: config.json, model.safetensors, generation_config.json and the tokenizer
files, loadable by transformers, lm-evaluation-harness and vLLM.

The layout follows the run's architecture: Llama, Qwen2 or Qwen3 (:mod:`~megatron_anchor.export.hf_llama`) for
RoPE/RMSNorm/SwiGLU runs (Qwen2 with q/k/v biases only, Qwen3 with q/k norms), GPT-2 (:mod:`~megatron_anchor.export.hf_gpt2`) for learned-position/LayerNorm/GeLU runs; anything
else is refused with the flags each layout would need. The folder is written under a temporary name and renamed
when complete. Memory: one float32 copy of the weights (plus megatron's while the checkpoint is read).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence

from megatron_anchor.export.hf_gpt2 import gpt2_config, gpt2_problems, gpt2_state_dict
from megatron_anchor.export.hf_llama import (llama_config, llama_problems, qwen2_config, qwen2_problems,
                                             qwen3_config, qwen3_problems)
from megatron_anchor.inference.model import DecoderLM, ModelSpec


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


def save_folder(model: DecoderLM, tokenizer, tokenizer_type: str, out_dir: str, check_texts: Sequence[str] = (),
                extra: Optional[Dict] = None, overwrite: bool = False) -> List[str]:
    """Write the model and tokenizer into ``out_dir`` (via a temporary folder); returns the written file names."""
    from safetensors.torch import save_file

    from megatron_anchor.export.tokenizer import write_tokenizer

    layout = choose_layout(model.spec)
    config = layout.config(model.spec, tokenizer.eod, extra)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    tmp = out_dir.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(layout.state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": tokenizer.eod, "do_sample": True, "temperature": 1.0}, f, indent=2)
        files = ["config.json", "generation_config.json", "model.safetensors"]
        files += write_tokenizer(tokenizer, tokenizer_type, tmp, check_texts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return files


def export_checkpoint(model_args: Sequence[str], out_dir: str, load: Optional[str] = None,
                      iteration: Optional[int] = None, check_texts: Sequence[str] = (),
                      gelu_approximation: str = "none", overwrite: bool = False) -> Dict:
    """Read a checkpoint (any TP/PP layout, the trainer's model flags) and write the folder; returns a summary.

    ``gelu_approximation``: "tanh" for GeLU runs trained with megatron's fused bias-GeLU kernel or Transformer
    Engine (both compute the tanh approximation), "none" for the erf GeLU of megatron's unfused MLP (CPU runs).
    """
    from megatron_anchor.inference.checkpoint import checkpoint_config, load_decoder

    cfg, load = checkpoint_config(model_args, load)
    layout = choose_layout(replace(ModelSpec.from_anchor_config(cfg, 0), gelu_approximation=gelu_approximation))
    model, tok, loaded = load_decoder(cfg, load, iteration, gelu_approximation=gelu_approximation)
    files = save_folder(model, tok, cfg.data.tokenizer_type, out_dir, check_texts,
                        extra={"source_checkpoint": os.path.abspath(loaded.path),
                               "saved_layout": loaded.saved_layout, "tokenizer_vocab_size": tok.vocab_size},
                        overwrite=overwrite)
    return {"output": out_dir, "architecture": layout.name, "files": files, "checkpoint": loaded.path,
            "saved_layout": loaded.saved_layout, "vocab_size": model.spec.vocab_size,
            "tokenizer_vocab_size": tok.vocab_size}
