"""Import a Hugging Face model folder (Llama 2/3, Mistral, SmolLM/SmolLM2, Qwen2/2.5, Qwen3) as a checkpoint.

    python tools/import_hf.py --input HF_FOLDER --output CKPT_DIR --add-annotation-tokens
    torchrun ... pretrain_anchor.py --finetune --load CKPT_DIR --save MID_DIR --data-path ... \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model CKPT_DIR/tokenizer ...

The checkpoint holds the weights (float32, global shapes: any TP/PP layout loads it), run_config.yaml (so
generation, export and --finetune need no model flags), the tokenizer folder CKPT_DIR/tokenizer (with the
annotation delimiters as special tokens under --add-annotation-tokens; the data tools take it as
--tokenizer-model) and its tokenizer record. A folder the importer cannot map exactly (another architecture, a
RoPE scaling or a bias layout megatron-core cannot express, quantized weights) is refused by name before any weight
is read. Nothing is downloaded: the folder must be on disk.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from megatron_anchor.bounds import Bounds, flag_type  # standard library only


def build_parser() -> argparse.ArgumentParser:
    """The tool's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="Hugging Face model folder (config.json, weights, tokenizer.json), or a .gguf file, first "
                        "written as a float32 folder OUTPUT_hf (needs the gguf package)")
    p.add_argument("--output", required=True, help="checkpoint directory to write (a --load for the trainer)")
    p.add_argument("--add-annotation-tokens", action="store_true",
                   help="add the annotation delimiters to the tokenizer as special tokens, with embedding and "
                        "output rows initialised to the mean of the existing rows")
    p.add_argument("--seq-length", type=flag_type(int, Bounds(ge=1)), default=None,
                   help="sequence length recorded in run_config.yaml (default: the model's context, at most 4096) "
                        "[>= 1]")
    p.add_argument("--make-vocab-size-divisible-by", type=flag_type(int, Bounds(ge=1)), default=128,
                   help="pad grown vocabularies to a multiple of this (default 128, Megatron-LM's) [>= 1]")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token text (default: the tokenizer's eos_token)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Import; prints a JSON summary. Returns 0, or 2 when the folder is refused."""
    from megatron_anchor.hf_import import ImportRefused, import_hf

    parser = build_parser()
    args = parser.parse_args(argv)
    src = args.input
    if src.endswith(".gguf"):
        from megatron_anchor.hf_import.gguf import gguf_to_hf_folder
        from megatron_anchor.outputs import require_input

        try:
            require_input(src, "--input")
        except FileNotFoundError as exc:
            parser.error(str(exc))
        src = gguf_to_hf_folder(src, args.output.rstrip("/") + "_hf")
    try:
        summary = import_hf(src, args.output, add_annotation_tokens=args.add_annotation_tokens,
                            seq_length=args.seq_length, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                            eod_token=args.eod_token, overwrite=args.overwrite)
    except ImportRefused as exc:
        print(f"import_hf.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
