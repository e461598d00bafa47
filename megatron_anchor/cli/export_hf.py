"""Export a megatron-anchor checkpoint as a Hugging Face folder (Llama or GPT-2 layout).

    python tools/export_hf.py --load CKPT_DIR --output OUT_DIR
    python tools/export_hf.py --load CKPT_DIR --output OUT_DIR --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model sp.model --num-layers 2 --hidden-size 64 --num-attention-heads 4 \\
        --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear

The checkpoint may have been saved under any TP/PP layout. The model's architecture and tokenizer come from the
checkpoint's run_config.yaml, or the training run's own flags or ``--config`` file (every flag of
``pretrain_anchor.py --help`` is accepted; those that do not describe the model are ignored).
Llama-shaped runs (RoPE, RMSNorm, SwiGLU) are written as ``LlamaForCausalLM``; GPT-2-shaped runs (learned
positions, LayerNorm, GeLU MLP: the trainer's defaults) as ``GPT2LMHeadModel``; other runs are refused with the
flags each would need. Writes config.json, model.safetensors (float32), generation_config.json, tokenizer.json,
tokenizer_config.json and special_tokens_map.json (the delimiters are special tokens with their training ids,
and text that spells them is split into ordinary tokens: split_special_tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from megatron_anchor.bounds import ranged
from megatron_anchor.outputs import OutputError, require_input


def build_parser() -> argparse.ArgumentParser:
    """This tool's own flags; all other flags go to the trainer's parser (model description)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory (a --save directory or an iter_XXXXXXX folder)")
    p.add_argument("--output", required=True, help="folder to write the Hugging Face model into")
    p.add_argument("--iteration", default=None,
                   **ranged(int, "iteration to export (default: the latest)", ge=0))
    p.add_argument("--gelu-approximation", choices=("none", "tanh"), default="none",
                   help="GeLU runs: none = the erf GeLU of megatron's unfused MLP (CPU training); tanh = runs "
                        "trained with megatron's fused bias-GeLU kernel or Transformer Engine (GPU) (default none)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output folder written by an earlier export (any other non-empty "
                        "folder is refused)")
    p.add_argument("--allow-missing-tokenizer-record", action="store_true",
                   help="export a checkpoint that has no tokenizer_record.json (written before records existed) "
                        "with the tokenizer flags given; without this such a checkpoint is refused")
    p.add_argument("--check-texts", default=None,
                   help="JSONL file whose 'text' fields are used to verify the exported tokenizer gives the "
                        "training tokenizer's ids (first 200 lines; a few built-in texts are always checked)")
    return p


def read_check_texts(path: str, limit: int = 200) -> List[str]:
    """The 'text' fields of the first ``limit`` lines of a JSONL file; a bad line is an error naming it."""
    from megatron_anchor.export import ExportError

    require_input(path, "--check-texts")
    texts = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if i > limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ExportError(f"--check-texts {path}:{i}: not a JSON object ({exc})") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                texts.append(obj["text"])
    return texts


def main(argv: Optional[List[str]] = None) -> int:
    """Export; prints a JSON summary. Returns 0, or 2 on a bad checkpoint or configuration."""
    from megatron_anchor.export import ExportError, TokenizerExportError, export_checkpoint
    from megatron_anchor.inference.checkpoint import CheckpointError

    args, model_args = build_parser().parse_known_args(argv)
    try:
        texts = read_check_texts(args.check_texts) if args.check_texts else []
        summary = export_checkpoint(model_args, args.output, load=args.load, iteration=args.iteration,
                                    check_texts=texts, gelu_approximation=args.gelu_approximation,
                                    overwrite=args.overwrite,
                                    allow_missing_record=args.allow_missing_tokenizer_record)
    except (CheckpointError, ExportError, TokenizerExportError, OutputError, FileNotFoundError) as exc:
        print(f"export_hf.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
