"""Measure annotated mid-training: well-formed annotations where a chunk starts, and held-out text loss against the
imported model's.

    python tools/evaluate_midtraining.py --base IMPORTED_CKPT --model MIDTRAINED_CKPT --heldout heldout.jsonl \\
        --annotated annotated.jsonl --output report.json

Both are checkpoint directories (or exported folders); their run_config.yaml supplies the model. The held-out file
is raw JSONL ({"text": ...}) the mid-training did not see. --annotated (the mid-training's annotated JSONL) sizes
the annotation cap: 1.5x its longest annotation. Definitions and costs: megatron_anchor/eval/midtrain.py.
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from megatron_anchor.bounds import Bounds, flag_type  # standard library only


def build_parser() -> argparse.ArgumentParser:
    """The tool's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the imported checkpoint (or exported folder)")
    p.add_argument("--model", required=True, help="the mid-trained checkpoint (or exported folder)")
    p.add_argument("--heldout", required=True, help="raw JSONL of held-out documents")
    p.add_argument("--seq-length", type=flag_type(int, Bounds(ge=2)), default=256,
                   help="window of the held-out loss (default 256) [>= 2]")
    p.add_argument("--n", type=flag_type(int, Bounds(ge=1)), default=4,
                   help="anchored samples per chunk start (default 4) [>= 1]")
    p.add_argument("--chunks-per-document", type=flag_type(int, Bounds(ge=1)), default=4,
                   help="chunk starts per held-out document (default 4) [>= 1]")
    p.add_argument("--annotated", default=None,
                   help="annotated JSONL the model was mid-trained on: the annotation cap is 1.5x its longest "
                        "annotation (tokens)")
    p.add_argument("--max-annotation-tokens", type=flag_type(int, Bounds(ge=1)), default=None,
                   help="the annotation cap itself (default: from --annotated, else midtrain.DEFAULT_CAP) [>= 1]")
    p.add_argument("--max-heldout-tokens", type=flag_type(int, Bounds(ge=1)), default=None,
                   help="score only the first N held-out tokens (default: all) [>= 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--output", default=None, help="write the report as JSON here too")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Print the report (JSON). Returns 0, or 2 on bad input (the message names the flag and file)."""
    import torch

    from megatron_anchor.eval.midtrain import (
        DEFAULT_CAP,
        annotation_cap,
        chunk_start_prompts,
        heldout_texts,
        midtraining_report,
        prompt_room,
    )
    from megatron_anchor.inference.checkpoint import CheckpointError
    from megatron_anchor.inference.generator import load_any
    from megatron_anchor.outputs import OutputError, atomic_write, check_outputs, require_input

    parser = build_parser()
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        # Every input and the output are checked before either model is loaded (minutes for a real model).
        check_outputs([("--output", args.output)], [("--heldout", args.heldout), ("--annotated", args.annotated)])
        require_input(args.heldout, "--heldout")
        if args.annotated:
            require_input(args.annotated, "--annotated")
        for flag, path in (("--base", args.base), ("--model", args.model)):
            require_input(path, flag, folder=True)
        texts = heldout_texts(args.heldout)
        if not chunk_start_prompts(texts, args.chunks_per_document):
            raise ValueError(f"--heldout {args.heldout}: no document has a blank-line chunk boundary (nothing to "
                             "sample annotations at)")
        models = {}
        for flag, path in (("--base", args.base), ("--model", args.model)):
            try:
                models[flag] = load_any(path)
            except (OSError, ValueError, CheckpointError) as exc:
                raise CheckpointError(f"{flag} {path}: {exc}") from None
        cap = {"cap": args.max_annotation_tokens or DEFAULT_CAP}
        if args.annotated and not args.max_annotation_tokens:
            # Tokenized as the mid-trained model was trained (its tokenizer); a bad line names the file and line.
            cap = annotation_cap(models["--model"].tokenizer, args.annotated)
        for flag, gen in models.items():
            limit = gen.model.spec.max_positions
            if args.seq_length > limit:
                raise ValueError(f"--seq-length {args.seq_length} exceeds the {limit} positions of {flag}'s model")
            prompt_room(gen, cap["cap"])
    except (OSError, ValueError, CheckpointError, OutputError) as exc:
        parser.error(str(exc))
    base, model = models["--base"], models["--model"]
    report = midtraining_report(base, model, texts, args.seq_length, args.n, args.chunks_per_document, args.seed,
                                cap["cap"], args.max_heldout_tokens)
    if "longest" in cap:
        report["longest_training_annotation_tokens"] = cap["longest"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with atomic_write(args.output) as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
