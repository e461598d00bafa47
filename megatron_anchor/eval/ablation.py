"""The replay ablation's grid: its settings, the plan, one point's run, and the results, table and plot.

A point (seed, setting, SFT length) is one quickstart run over the seed's shared base checkpoint
(:func:`run_point`); :func:`run_grid` runs a plan of points in order, skipping finished ones, and rewrites
``results.json``, ``table.md`` and ``gap_closed.png`` from every finished point after each. The tool
``megatron_anchor.cli.ablation_sft`` turns flags into these calls; its docstring describes the study.

Cost: one base per seed, then per point two SFT runs (time linear in the SFT length) and three models' samples
(linear in prompts x samples). Memory: the result rows of the finished points (a few per point). Disk: two small
checkpoints per point.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_anchor.eval.studies import quickstart_default, run_quickstart
from megatron_anchor.outputs import atomic_path, atomic_write, write_json, write_text


@dataclass(frozen=True)
class Setting:
    """One line of the ablation: a replay share and objective, and the SFT data size."""

    name: str
    """Label in the table and the plot."""
    replay: float
    """Share of replayed pretraining documents in both SFT runs (0: none)."""
    policy: str = "pretrain"
    """The anchored run's replay objective: pretrain (annotations included) or pretrain-text (masked)."""
    sft_factor: int = 1
    """SFT data size as a multiple of the quickstart's SFT samples (a superset of them)."""
    lengths: Optional[Sequence[int]] = None
    """SFT lengths for this setting (None: all of --lengths)."""
    tier: int = 1
    """Run order: every point of tier 1 (what the targets need, all seeds) before any of tier 2, and so on."""
    tier_of_length: Tuple[Tuple[int, int], ...] = ()
    """(length, tier) pairs that override ``tier`` for one length."""

    def tier_for(self, length: int) -> int:
        return dict(self.tier_of_length).get(length, self.tier)

    @property
    def slug(self) -> str:
        return f"replay{self.replay:g}_{self.policy}_x{self.sft_factor}"


DEFAULT_SETTINGS = (
    Setting("no replay", 0.0, tier_of_length=((1000, 2),)),
    Setting("replay 0.3 (default)", 0.3),
    Setting("replay 0.3, annotations masked", 0.3, "pretrain-text", tier=2, tier_of_length=((40, 3),)),
    Setting("replay 0.1", 0.1, tier=3),
    Setting("replay 0.5", 0.5, tier=3),
    # The paper's "more SFT data" question; 40 iterations do not see 4x the data, so longer runs only.
    Setting("no replay, 4x SFT data", 0.0, sft_factor=4, lengths=(200, 1000), tier=4),
    Setting("replay 0.3, 4x SFT data", 0.3, sft_factor=4, lengths=(200, 1000), tier=4),
)
DEFAULT_LENGTHS = (40, 200, 1000)
# Report keys (megatron_anchor/eval/quickstart.py): the training annotator's tag and topic entropy, and the
# independent embedding judges.
TAG, TOPIC, EMB, DISTINCT = ("annotator:attribute_entropy", "annotator:entropy_topic", "embedding:pairwise_distance",
                             "distinct:distinct")


def default_pre_iters() -> int:
    """The base pretraining length the quickstart would use here ($PRE_ITERS, else its script's default)."""
    return int(os.environ.get("PRE_ITERS") or quickstart_default("PRE_ITERS"))


def _base_ready(base: str) -> bool:
    return os.path.exists(os.path.join(base, "ck_base", "latest_checkpointed_iteration.txt")) and \
        os.path.exists(os.path.join(base, "pretrain_plain_text_document.idx"))


def ensure_base(out: str, seed: int, pre_iters: int) -> str:
    """The seed's data and base checkpoint, pretrained for ``pre_iters`` iterations (built once)."""
    base = os.path.join(out, f"seed{seed}", "base")
    if not _base_ready(base):
        run_quickstart(base, {"SEED": str(seed), "SFT_ITERS": "0", "PRE_ITERS": str(pre_iters)},
                        os.path.join(out, f"seed{seed}", "base.log"))
    return base


def check_pre_iters(out: str, pre_iters: int) -> None:
    """Record the base pretraining length of ``out`` on first use; refuse another one later (its points would
    mix two different bases in one table)."""
    path = os.path.join(out, "ablation.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)["pre_iters"]
        if recorded != pre_iters:
            raise SystemExit(f"ablation_sft.py: error: {out} holds bases pretrained for {recorded} iterations, not "
                             f"--pre-iters {pre_iters}; use another --out for another base length")
        return
    os.makedirs(out, exist_ok=True)
    default = int(quickstart_default("PRE_ITERS"))
    if glob.glob(os.path.join(out, "seed*", "base")) and pre_iters != default:
        # Bases written before the record existed: the quickstart's default length.
        raise SystemExit(f"ablation_sft.py: error: {out} holds bases of the quickstart's {default} pretraining "
                         f"iterations; use another --out for --pre-iters {pre_iters}")
    write_json(path, {"pre_iters": pre_iters})


def sft_input(base: str, factor: int, seed: int) -> str:
    """The SFT JSONL of a data size: the quickstart's samples, plus new ones from the same generator for
    ``factor`` > 1 (a superset, so "more data" only adds). Held-out prompts and references stay the same."""
    src = os.path.join(base, "sft.jsonl")
    if factor == 1:
        return src
    from megatron_anchor.data.demo_corpus import sft_sample

    path = os.path.join(base, f"sft_x{factor}.jsonl")
    if os.path.exists(path):
        return path
    with open(src, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    rng = random.Random(1_000_003 * (seed + 1) + factor)  # a stream disjoint from the corpus writer's
    with atomic_write(path) as f:
        f.writelines(lines)
        for _ in range((factor - 1) * len(lines)):
            f.write(json.dumps(sft_sample(rng)) + "\n")
    return path


def point_dir(out: str, seed: int, setting: Setting, length: int) -> str:
    return os.path.join(out, f"seed{seed}", setting.slug, f"it{length}")


def _link_standard(out: str, seed: int, setting: Setting, length: int, work: str) -> None:
    """Point ``work/ck_sft_standard`` at the one standard checkpoint for (length, replay share, SFT data)."""
    shared = os.path.join(out, f"seed{seed}", "standard", f"replay{setting.replay:g}_x{setting.sft_factor}_it{length}")
    os.makedirs(shared, exist_ok=True)
    link = os.path.join(work, "ck_sft_standard")
    if not os.path.islink(link):
        os.makedirs(work, exist_ok=True)
        os.symlink(os.path.abspath(shared), link)


def run_point(out: str, seed: int, setting: Setting, length: int, n: int, pre_iters: int) -> Dict:
    """Train and measure one point (or read its earlier result); returns its result row."""
    work = point_dir(out, seed, setting, length)
    report_path = os.path.join(work, "report.json")
    if not os.path.exists(report_path):
        base = ensure_base(out, seed, pre_iters)
        _link_standard(out, seed, setting, length, work)
        env = {"BASE": os.path.abspath(base), "SEED": str(seed), "N": str(n), "SFT_ITERS": str(length),
               "PRE_ITERS": str(pre_iters),
               "SFT_REPLAY": f"{setting.replay:g}", "SFT_REPLAY_POLICY": setting.policy,
               "SFT_INPUT": os.path.abspath(sft_input(base, setting.sft_factor, seed)),
               # One temperature, no export or lm-eval per point: the ablation measures diversity and binding.
               "TEMPS": "1.0", "ABILITY": "0"}
        run_quickstart(work, env, os.path.join(work, "run.log"))
    with open(report_path, encoding="utf-8") as f:
        report = json.load(f)
    return result_row(report, seed, setting, length)


def result_row(report: Dict, seed: int, setting: Setting, length: int) -> Dict:
    """The numbers of one point that the table and plot use."""
    m = report["models"]
    return {"seed": seed, "setting": setting.name, "length": length, "replay": setting.replay,
            "policy": setting.policy, "sft_factor": setting.sft_factor,
            "gap_closed": report["gap_closed"], "gap_closed_well_formed": report.get("gap_closed_well_formed"),
            "models": {name: {k: v for k, v in row.items() if not isinstance(v, (dict, list))}
                       for name, row in m.items()}}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}"


def _loss(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# Reports written before the judges were named (tag entropy, topic entropy and embedding distance under bare
# metric names) still count: an ablation resumes over points of either age.
LEGACY_KEYS = {TAG: "semantic_entropy", TOPIC: "topic_entropy", EMB: "pairwise_distance"}


def _gap(key: str, well_formed: bool = False):
    def get(r):
        gaps = r["gap_closed_well_formed" if well_formed else "gap_closed"] or {}
        value = gaps.get(key)
        return gaps.get(LEGACY_KEYS.get(key, key)) if value is None else value
    return get


# (header, value of a result row, format): the table's columns after setting and length.
COLUMNS = (
    ("gap closed, tag entropy (%)", _gap(TAG), _pct),
    ("topic entropy (%)", _gap(TOPIC), _pct),
    ("embedding distance (%)", _gap(EMB), _pct),
    ("distinct classes (%)", _gap(DISTINCT), _pct),
    ("tag entropy, well-formed only (%)", _gap(TAG, True), _pct),
    ("annotations closed (%)", lambda r: r["models"]["anchored-SFT"].get("annotation_closed"), _pct),
    ("annotations well formed (%)", lambda r: r["models"]["anchored-SFT"].get("annotation_well_formed"), _pct),
    ("responses follow (%)", lambda r: r["models"]["anchored-SFT"].get("follows_annotation"), _pct),
    # What SFT starts from: a base model that binds text to its annotation less leaves less to keep.
    ("responses follow, base model (%)", lambda r: r["models"]["base"].get("follows_annotation"), _pct),
    ("held-out loss, anchored SFT", lambda r: r["models"]["anchored-SFT"].get("loss"), _loss),
    ("held-out loss, standard SFT", lambda r: r["models"]["standard-SFT"].get("loss"), _loss),
)


def format_table(rows: List[Dict], settings: Sequence[Setting]) -> str:
    """Markdown table, one line per (setting, length); each cell lists the seeds' values, '/'-separated ('–'
    where a seed has no such point)."""
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Each cell: seed {' / seed '.join(map(str, seeds))}.", "",
             "| setting | SFT iters | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|" + "---|" * (2 + len(COLUMNS))]
    for s in settings:
        for length in sorted({r["length"] for r in rows if r["setting"] == s.name}):
            by_seed = {r["seed"]: r for r in rows if r["setting"] == s.name and r["length"] == length}
            cells = [" / ".join(fmt(get(by_seed[k])) if k in by_seed else "–" for k in seeds)
                     for _, get, fmt in COLUMNS]
            lines.append(f"| {s.name} | {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PANELS = (
    ("gap closed, tag entropy", _gap(TAG)),
    ("gap closed, embedding distance", _gap(EMB)),
    ("gap closed, tag entropy (well-formed only)", _gap(TAG, True)),
    ("annotations well formed", lambda r: r["models"]["anchored-SFT"].get("annotation_well_formed")),
    ("responses follow their annotation", lambda r: r["models"]["anchored-SFT"].get("follows_annotation")),
    ("held-out response loss, anchored SFT", lambda r: r["models"]["anchored-SFT"].get("loss")),
)


def plot(rows: List[Dict], settings: Sequence[Setting], path: str) -> str:
    """One panel per measure against SFT length (log axis), one line per setting: mean over seeds, range as
    error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (title, get) in zip(axes.flat, PANELS):
        for s in settings:
            xs, ys, lo, hi = [], [], [], []
            for length in sorted({r["length"] for r in rows if r["setting"] == s.name}):
                vals = [get(r) for r in rows if r["setting"] == s.name and r["length"] == length]
                vals = [v for v in vals if v is not None]
                if vals:
                    xs.append(length)
                    ys.append(float(np.mean(vals)))
                    lo.append(ys[-1] - min(vals))
                    hi.append(max(vals) - ys[-1])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=s.name)
        ax.set_xscale("log")
        lengths = sorted({r["length"] for r in rows})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("SFT iterations")
        if "loss" not in title:
            ax.axhline(0.85 if "gap" in title or "follow" in title else 0.95, color="grey", linestyle=":",
                       linewidth=1)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Anchored SFT with pretraining replay: the effect against SFT length (mean over seeds, range)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finished_rows(out: str) -> List[Dict]:
    """The result rows of every finished point under ``out`` (any seed, setting of the grid and length), whichever
    runs of the tool made them, in table order: what results, table and plot are written from."""
    rows = []
    seeds = sorted(int(m.group(1)) for m in (re.fullmatch(r"seed(\d+)", n) for n in os.listdir(out)) if m)
    for order, setting in enumerate(DEFAULT_SETTINGS):
        for seed in seeds:
            for it in glob.glob(os.path.join(out, f"seed{seed}", setting.slug, "it*", "report.json")):
                length = re.fullmatch(r"it(\d+)", os.path.basename(os.path.dirname(it)))
                if length:
                    with open(it, encoding="utf-8") as f:
                        rows.append((order, int(length.group(1)), seed,
                                     result_row(json.load(f), seed, setting, int(length.group(1)))))
    return [r for *_, r in sorted(rows, key=lambda t: t[:3])]


def write_outputs(out: str, rows: List[Dict], settings: Sequence[Setting]) -> None:
    """``results.json``, ``table.md`` and ``gap_closed.png`` (each written under a temporary name first)."""
    for name, text in (("results.json", json.dumps(rows, indent=1)), ("table.md", format_table(rows, settings))):
        write_text(os.path.join(out, name), text + "\n")
    if rows:
        with atomic_path(os.path.join(out, "gap_closed.png"), suffix=".png") as tmp:
            plot(rows, settings, tmp)


def plan(seeds: Sequence[int], lengths: Sequence[int], settings: Sequence[Setting]) -> List[tuple]:
    """(seed, setting, length) in run order: tier by tier, then seed by seed, short runs first, so that an
    ablation stopped early has already measured what the targets need."""
    points = []
    for tier in sorted({s.tier_for(n) for s in settings for n in lengths}):
        for seed in seeds:
            for length in sorted(lengths):
                for s in settings:
                    if s.tier_for(length) == tier and (s.lengths is None or length in s.lengths):
                        points.append((seed, s, length))
    return points


def run_grid(out: str, points: Sequence[tuple], n: int, pre_iters: int, report_only: bool = False
             ) -> Tuple[int, int, List[Dict]]:
    """Run ``points`` ((seed, setting, length), see :func:`plan`) one after another, printing a line per point;
    with ``report_only`` only finished points are read. A point whose run fails is reported on stderr and
    skipped. Results, table and plot are rewritten after every point and at the end, from every finished point
    under ``out``. Returns (points run or read, points failed, the finished rows)."""
    ran, failed = 0, 0
    start = time.time()
    for k, (seed, s, length) in enumerate(points, 1):
        done = os.path.exists(os.path.join(point_dir(out, seed, s, length), "report.json"))
        if report_only and not done:
            continue
        print(f"[{k}/{len(points)}] {time.strftime('%H:%M:%S')} seed {seed} | {s.name} | {length} iterations"
              f"{' (done before)' if done else ''}", flush=True)
        try:
            row = run_point(out, seed, s, length, n, pre_iters)
        except RuntimeError as exc:
            print(f"   failed: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        ran += 1
        g = row["gap_closed"]
        anc = row["models"]["anchored-SFT"]
        print(f"   gap closed tag/topic/emb/distinct {_pct(g.get(TAG))}/{_pct(g.get(TOPIC))}/{_pct(g.get(EMB))}/"
              f"{_pct(g.get(DISTINCT))}%, well formed {_pct(anc.get('annotation_well_formed'))}%, follows "
              f"{_pct(anc.get('follows_annotation'))}%, loss {anc.get('loss'):.3f}; "
              f"{(time.time() - start) / 60:.0f} min so far", flush=True)
        write_outputs(out, finished_rows(out), DEFAULT_SETTINGS)
    rows = finished_rows(out)
    write_outputs(out, rows, DEFAULT_SETTINGS)
    return ran, failed, rows
