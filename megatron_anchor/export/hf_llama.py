"""Checkpoint -> Hugging Face Llama-style folder: config.json, model.safetensors, generation_config.json and the
tokenizer files, loadable by transformers (``LlamaForCausalLM``), lm-evaluation-harness and vLLM.

Weights go through :class:`megatron_anchor.inference.model.DecoderLM`, whose parameter names are Llama's, so the
generator and the export share one conversion (fused QKV split per query group, SwiGLU halves split, vocabulary
kept at its padded size). Architectures Llama cannot express are refused with the flags that would fix them.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from megatron_anchor.inference.model import DecoderLM, ModelSpec, spec_dict


class ExportError(ValueError):
    """The checkpoint cannot be written as a Llama folder."""


def llama_config(spec: ModelSpec, eos_token_id: int, extra: Optional[Dict] = None) -> Dict:
    """The transformers ``LlamaConfig`` fields for ``spec`` (float32, no bos token)."""
    problems = spec.llama_problems()
    if problems:
        raise ExportError("the model is not Llama-shaped; a Llama export needs a run trained with " +
                          ", ".join(problems))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_base,
        "rope_scaling": None,
        "attention_bias": spec.bias,
        "mlp_bias": spec.bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": spec.tied_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "use_cache": True,
        # The exact spec, so megatron_anchor.inference reads the folder back without guessing.
        "megatron_anchor": {"spec": spec_dict(spec), **(extra or {})},
    }
    return config


def save_folder(model: DecoderLM, tokenizer, tokenizer_type: str, out_dir: str, check_texts: Sequence[str] = (),
                extra: Optional[Dict] = None) -> List[str]:
    """Write the model and tokenizer into ``out_dir``; returns the written file names."""
    from safetensors.torch import save_file

    from megatron_anchor.export.tokenizer import write_tokenizer

    config = llama_config(model.spec, tokenizer.eod, extra)
    os.makedirs(out_dir, exist_ok=True)
    save_file(model.hf_state_dict(), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token_id": tokenizer.eod, "do_sample": True, "temperature": 1.0}, f, indent=2)
    files = ["config.json", "generation_config.json", "model.safetensors"]
    return files + write_tokenizer(tokenizer, tokenizer_type, out_dir, check_texts)


def export_checkpoint(model_args: Sequence[str], out_dir: str, load: Optional[str] = None,
                      iteration: Optional[int] = None, check_texts: Sequence[str] = ()) -> Dict:
    """Read a checkpoint (any TP/PP layout, the trainer's model flags) and write the folder; returns a summary."""
    from megatron_anchor.inference.checkpoint import checkpoint_config, load_decoder

    cfg, load = checkpoint_config(model_args, load)
    spec_problems = ModelSpec.from_anchor_config(cfg, 0).llama_problems()
    if spec_problems:  # refuse before spending time on loading
        raise ExportError("the model is not Llama-shaped; a Llama export needs a run trained with " +
                          ", ".join(spec_problems))
    model, tok, loaded = load_decoder(cfg, load, iteration)
    spec = model.spec
    files = save_folder(model, tok, cfg.data.tokenizer_type, out_dir, check_texts,
                        extra={"source_checkpoint": os.path.abspath(loaded.path),
                               "saved_layout": loaded.saved_layout, "tokenizer_vocab_size": tok.vocab_size})
    return {"output": out_dir, "files": files, "checkpoint": loaded.path, "saved_layout": loaded.saved_layout,
            "vocab_size": spec.vocab_size, "tokenizer_vocab_size": tok.vocab_size}
