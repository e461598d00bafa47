"""Measure annotated mid-training: well-formed annotations where a chunk starts, and held-out text loss against the
imported model's.

    python tools/evaluate_midtraining.py --base IMPORTED_CKPT --model MIDTRAINED_CKPT --heldout heldout.jsonl \\
        --output report.json

Both are checkpoint directories (or exported folders); their run_config.yaml supplies the model. The held-out file
is raw JSONL ({"text": ...}) the mid-training did not see. Definitions: megatron_anchor/eval/midtrain.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    """The tool's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the imported checkpoint (or exported folder)")
    p.add_argument("--model", required=True, help="the mid-trained checkpoint (or exported folder)")
    p.add_argument("--heldout", required=True, help="raw JSONL of held-out documents")
    p.add_argument("--seq-length", type=int, default=256, help="window of the held-out loss (default 256)")
    p.add_argument("--n", type=int, default=4, help="anchored samples per chunk start (default 4)")
    p.add_argument("--chunks-per-document", type=int, default=4, help="chunk starts per held-out document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the report as JSON here too")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Print the report (JSON). Returns 0."""
    import torch

    from megatron_anchor.eval.midtrain import heldout_texts, midtraining_report
    from megatron_anchor.inference.generator import load_any

    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    report = midtraining_report(load_any(args.base), load_any(args.model), heldout_texts(args.heldout),
                                args.seq_length, args.n, args.chunks_per_document, args.seed)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output + ".tmp", "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(args.output + ".tmp", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
