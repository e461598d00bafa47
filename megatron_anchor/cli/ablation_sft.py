"""The replay ablation: how long SFT, replay share, replay objective and SFT data size move the anchored effect.

    python tools/ablation_sft.py --out runs/ablation --seeds 0 1            # the whole grid (hours on 2 cores)
    python tools/ablation_sft.py --out runs/ablation --dry-run              # print the plan
    python tools/ablation_sft.py --out runs/ablation --report-only          # rebuild table and PNG

For each seed, ``examples/quickstart.sh`` builds the data and pretrains one base checkpoint (``SFT_ITERS=0``);
every point of the grid then reuses it (``BASE=...``): standard SFT and anchored SFT at one SFT length with one
replay setting, sampled and measured by the quickstart's own report (diversity beside format and binding, and
the held-out response loss). The standard-SFT baseline of a point gets the same share of the same pretraining
documents without annotations; its checkpoint depends only on (length, replay share, SFT data) and is trained
once and shared by the points that need it.

Points run one after another, each logging to ``POINT/run.log``. A rerun skips finished points (their
``report.json`` exists) and finished training stages, so an interrupted ablation resumes where it stopped.
Results accumulate in ``OUT/results.json``: it, ``OUT/table.md`` and ``OUT/gap_closed.png`` (gap closed against
SFT length, one line per setting, mean over seeds with the range as error bars) are rewritten after every point
from every finished point under ``OUT``, whichever runs of the tool (other seeds, settings, lengths) made them.

Cost: one base per seed (~2-3 minutes on 2 idle cores), then per point two SFT runs (time linear in the SFT
length) and three models' samples (linear in prompts x samples). Disk: two small checkpoints per point.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from megatron_anchor.bounds import ranged
from megatron_anchor.eval.ablation import (
    DEFAULT_LENGTHS,
    DEFAULT_SETTINGS,
    check_pre_iters,
    default_pre_iters,
    plan,
    point_dir,
    run_grid,
)
from megatron_anchor.eval.studies import quickstart_default


def build_parser() -> argparse.ArgumentParser:
    """Flags of the ablation."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="output directory (default runs/ablation)")
    p.add_argument("--seeds", nargs="+", default=[0, 1], **ranged(int, "base seeds (default 0 1)", ge=0))
    p.add_argument("--lengths", nargs="+", default=list(DEFAULT_LENGTHS),
                   **ranged(int, "SFT iterations (default 40 200 1000; 40 is the quickstart's)", ge=1))
    p.add_argument("--settings", nargs="+", default=None,
                   help="names of the settings to run (default all: " + "; ".join(s.name for s in DEFAULT_SETTINGS)
                        + ")")
    p.add_argument("--n", default=None, **ranged(int, "samples per held-out prompt (default: the quickstart's N)",
                                                  ge=2))
    p.add_argument("--pre-iters", default=None, **ranged(
        int, "pretraining iterations of each seed's base checkpoint (default: the quickstart's, $PRE_ITERS or its "
             "script's default); one value per --out, recorded in OUT/ablation.json", ge=1))
    p.add_argument("--dry-run", action="store_true", help="print the points and exit")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results, table and plot from the finished points without running anything")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the grid (resumable) and write results, table and plot; returns 0, 1 when a point failed, 2 on bad
    flags."""
    args = build_parser().parse_args(argv)
    settings = list(DEFAULT_SETTINGS)
    if args.settings:
        by_name = {s.name: s for s in DEFAULT_SETTINGS}
        unknown = [n for n in args.settings if n not in by_name]
        if unknown:
            print(f"ablation_sft.py: error: unknown settings {unknown}; choose from {list(by_name)}", file=sys.stderr)
            return 2
        settings = [by_name[n] for n in args.settings]
    points = plan(args.seeds, args.lengths, settings)
    if args.dry_run:
        for seed, s, length in points:
            print(f"seed {seed} | {s.name} | {length} iterations -> {point_dir(args.out, seed, s, length)}")
        return 0
    if args.n is None:
        args.n = int(quickstart_default("N"))
    if args.pre_iters is None:  # what the quickstart itself would pretrain for
        args.pre_iters = default_pre_iters()
    if args.pre_iters < 1:
        print("ablation_sft.py: error: --pre-iters must be at least 1", file=sys.stderr)
        return 2
    check_pre_iters(args.out, args.pre_iters)
    ran, failed, rows = run_grid(args.out, points, args.n, args.pre_iters, args.report_only)
    print(f"this plan: {ran} points, {failed} failed; {len(rows)} finished under {args.out}: "
          f"{os.path.join(args.out, 'table.md')}, {os.path.join(args.out, 'gap_closed.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
