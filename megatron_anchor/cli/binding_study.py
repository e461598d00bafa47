"""The binding study: does the quickstart's base model write text that follows its annotation, on every seed?

    python tools/binding_study.py --out runs/binding --seeds 0 1 2 3 4 --variants "" "ARCH=gpt2" "DROPOUT=0.1"
    python tools/binding_study.py --out runs/binding --report-only        # rebuild OUT/binding.md

A variant is a set of the quickstart's settings on top of its defaults ("": the defaults). For each variant x
seed, ``examples/quickstart.sh`` pretrains a base checkpoint (``SFT_ITERS=0``) and the base's anchored samples on
the held-out prompts are measured: annotations closed and well formed, responses on the topic their annotation
names. Resumable; ``OUT/binding.md`` is rewritten from every finished point after each one
(megatron_anchor/eval/studies.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from megatron_anchor.bounds import ranged
from megatron_anchor.eval import studies


def main(argv: Optional[List[str]] = None) -> int:
    """Run the grid (resumable), write ``OUT/binding.md``; returns 0, 1 when a point failed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/binding", help="output directory (default runs/binding)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0-4)")
    p.add_argument("--variants", nargs="+", default=[""],
                   help="quickstart settings per variant, 'NAME=VALUE ...' ('' = the defaults; default: only that)")
    p.add_argument("--n", default=32, **ranged(int, "samples per held-out prompt (default 32)", ge=1))
    p.add_argument("--report-only", action="store_true", help="rebuild the table without running anything")
    args = p.parse_args(argv)
    try:
        variants = [studies.parse_variant(v) for v in args.variants]
    except ValueError as exc:
        p.error(str(exc))
    failed = 0
    if not args.report_only:
        points = [(v, s) for v in variants for s in args.seeds]
        for k, (settings, seed) in enumerate(points, 1):
            print(f"[{k}/{len(points)}] {time.strftime('%H:%M:%S')} {studies.variant_name(settings)}, seed {seed}",
                  flush=True)
            try:
                r = studies.binding_point(args.out, settings, seed, args.n)
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
