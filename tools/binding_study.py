"""The binding study: does the quickstart's base model write text that follows its annotation, on every seed?

    python tools/binding_study.py --out runs/binding --seeds 0 1 2 3 4 --arch llama gpt2 --pre-iters 500
    python tools/binding_study.py --out runs/binding --report-only        # rebuild OUT/binding.md

For each architecture x pretraining length x seed, ``examples/quickstart.sh`` pretrains a base checkpoint
(``SFT_ITERS=0``) and the base's anchored samples on the held-out prompts are measured: annotations closed and
well formed, responses on the topic their annotation names. Resumable; ``OUT/binding.md`` is rewritten from every
finished point after each one (megatron_anchor/eval/studies.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from megatron_anchor.eval import studies


def main(argv: Optional[List[str]] = None) -> int:
    """Run the grid (resumable), write ``OUT/binding.md``; returns 0, 1 when a point failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/binding", help="output directory (default runs/binding)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0-4)")
    p.add_argument("--arch", nargs="+", default=["llama"], choices=["llama", "gpt2"],
                   help="the quickstart's ARCH values (default llama)")
    p.add_argument("--pre-iters", type=int, nargs="+", default=None,
                   help="pretraining iterations (default: the quickstart's PRE_ITERS)")
    p.add_argument("--n", type=int, default=32, help="samples per held-out prompt (default 32)")
    p.add_argument("--report-only", action="store_true", help="rebuild the table without running anything")
    args = p.parse_args(argv)
    lengths = args.pre_iters or [int(studies.quickstart_default("PRE_ITERS"))]
    if min(lengths) < 1 or args.n < 1:
        p.error("--pre-iters and --n must be at least 1")
    failed = 0
    if not args.report_only:
        points = [(a, it, s) for a in args.arch for it in lengths for s in args.seeds]
        for k, (arch, it, seed) in enumerate(points, 1):
            print(f"[{k}/{len(points)}] {time.strftime('%H:%M:%S')} {arch}, {it} iterations, seed {seed}", flush=True)
            try:
                r = studies.binding_point(args.out, arch, it, seed, args.n)
            except RuntimeError as exc:
                print(f"   failed: {exc}", file=sys.stderr, flush=True)
                failed += 1
                continue
            print(f"   follows {100 * r['follows_annotation']:.0f}%, closed {100 * r['annotation_closed']:.0f}%",
                  flush=True)
            studies.write_table(args.out)
    print(studies.write_table(args.out))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
