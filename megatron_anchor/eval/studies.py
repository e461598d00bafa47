"""Studies that run ``examples/quickstart.sh`` from Python: its defaults, one run with a log, and the binding study.

The binding study asks what makes the quickstart's base model bind text to its annotation (respond on the
topic its sampled annotation names) on every seed: for each variant (settings of the script on top of its
defaults, e.g. ``ARCH=gpt2`` or ``DROPOUT=0.1 PRE_ITERS=700``) and seed, the script pretrains one base checkpoint
(``SFT_ITERS=0``) and
:func:`megatron_anchor.eval.quickstart.measure_binding` samples it on the held-out prompts. A point is finished
when its ``binding.json`` exists; a rerun skips finished points and finished bases, so a stopped study resumes.
Each point records the base's wall time and the machine's load average, since a shared machine slows it.

Cost per point: the script's data stages and pretraining (linear in ``PRE_ITERS``; ~3 minutes for 500 iterations
on 2 idle cores), then prompts x N anchored samples. Disk: one small checkpoint per point.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from typing import Dict, List, Optional, Sequence

from megatron_anchor.outputs import write_json, write_text

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "examples", "quickstart.sh")


def quickstart_default(name: str) -> str:
    """The default the quickstart script gives its setting ``name`` (``NAME="${NAME:-VALUE}"``): the script is the
    one place that holds it. Raises when the script no longer spells it that way."""
    with open(QUICKSTART, encoding="utf-8") as f:
        m = re.search(rf'^{name}="\$\{{{name}:-([^}}]*)\}}"', f.read(), re.M)
    if m is None:
        raise RuntimeError(f"{QUICKSTART} no longer sets {name} as {name}=\"${{{name}:-DEFAULT}}\"")
    return m.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_quickstart(work: str, env: Dict[str, str], log_path: str) -> None:
    """Run the quickstart into ``work`` with ``env`` on top of ours, appending its output to ``log_path``; raise
    RuntimeError with the log's tail on failure."""
    os.makedirs(work, exist_ok=True)
    # One thread per process: on a shared machine a multi-threaded torch spends its time spinning (the report's
    # sampling ran 8x faster with one thread on a loaded 2-core machine); torchrun sets it for training anyway.
    full = {"OMP_NUM_THREADS": "1", **os.environ, "MASTER_PORT": str(_free_port()), "PYTHONUNBUFFERED": "1", **env}
    full["PYTHONPATH"] = REPO + os.pathsep + full.get("PYTHONPATH", "")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(f'{k}={v}' for k, v in env.items())}\n")
        log.flush()
        r = subprocess.run(["bash", QUICKSTART, os.path.abspath(work)], env=full, stdout=log,
                           stderr=subprocess.STDOUT)
    if r.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"quickstart failed in {work} (exit {r.returncode}); log {log_path}:\n{tail}")


def base_finished(work: str, pre_iters: int) -> bool:
    """Whether ``work`` holds the script's base checkpoint at iteration ``pre_iters``."""
    path = os.path.join(work, "ck_base", "latest_checkpointed_iteration.txt")
    return os.path.exists(path) and open(path, encoding="utf-8").read().strip() == str(pre_iters)


def _load() -> str:
    with open("/proc/loadavg", encoding="utf-8") as f:
        return " ".join(f.read().split()[:3])


def parse_variant(text: str) -> Dict[str, str]:
    """A variant of the quickstart: space-separated ``NAME=VALUE`` settings on top of its defaults (``""``: the
    defaults). Every setting is checked against the script's knobs; a bad one is a ValueError naming it."""
    from megatron_anchor.eval.quickstart_stages import check_knobs

    settings = {}
    for item in text.split():
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"variant {text!r}: {item!r} is not NAME=VALUE")
        settings[name] = value
    reserved = sorted(set(settings) & {"SEED", "SFT_ITERS", "DRY_RUN"})
    if reserved:
        raise ValueError(f"variant {text!r}: {', '.join(reserved)} are set by the study")
    errors = check_knobs(settings)
    if errors:
        raise ValueError(f"variant {text!r}: " + "; ".join(errors))
    return settings


def variant_name(settings: Dict[str, str]) -> str:
    """How a variant is labelled (and its folder named): its settings in order, or ``default``."""
    return " ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "default"


def point_dir(out: str, settings: Dict[str, str], seed: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant_name(settings))
    return os.path.join(out, slug, f"seed{seed}")


def binding_point(out: str, settings: Dict[str, str], seed: int, n: int) -> Dict:
    """Pretrain (unless done) and measure one base of a variant; returns the point's record (also
    ``binding.json``)."""
    from megatron_anchor.eval.quickstart import measure_binding

    work = point_dir(out, settings, seed)
    path = os.path.join(work, "binding.json")
    pre_iters = int(settings.get("PRE_ITERS") or quickstart_default("PRE_ITERS"))
    if not os.path.exists(path):
        timing = os.path.join(work, "base_timing.json")
        if not base_finished(work, pre_iters):
            load, start = _load(), time.time()
            run_quickstart(work, {**settings, "SEED": str(seed), "SFT_ITERS": "0"}, os.path.join(work, "run.log"))
            write_json(timing, {"base_minutes": (time.time() - start) / 60, "load_before": load,
                                "load_after": _load()})
        measure_binding(work, os.path.join(work, "ck_base"), n, seed)
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if os.path.exists(timing):
            with open(timing, encoding="utf-8") as f:
                record.update(json.load(f))
        record.update(seed=seed, variant=variant_name(settings), settings=settings)
        write_json(path, record, indent=2)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def finished_points(out: str) -> List[Dict]:
    """Every finished point under ``out``, ordered by variant (the defaults first) and seed."""
    rows = []
    for variant in sorted(os.listdir(out)) if os.path.isdir(out) else ():
        if not os.path.isdir(os.path.join(out, variant)):
            continue
        for seed_dir in sorted(os.listdir(os.path.join(out, variant))):
            path = os.path.join(out, variant, seed_dir, "binding.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    rows.append(json.load(f))
    return sorted(rows, key=lambda r: (r["variant"] != "default", r["variant"], r["seed"]))


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}"


def binding_table(rows: Sequence[Dict]) -> str:
    """Markdown: one line per variant, each seed's share of responses following their annotation, the lowest,
    closed and well-formed annotations (lowest over seeds), the base's minutes and the load average it ran under."""
    lines = ["| variant (quickstart settings) | responses follow, per seed (%) | lowest (%) | "
             "annotations closed, lowest (%) | well formed, lowest (%) | base minutes (data + pretraining) | "
             "load average at start |", "|---|---|---|---|---|---|---|"]
    groups: Dict[str, List[Dict]] = {}
    for r in rows:
        groups.setdefault(r["variant"], []).append(r)
    for variant, rs in groups.items():
        minutes = [r["base_minutes"] for r in rs if "base_minutes" in r]
        lines.append(
            f"| {variant} | " + " / ".join(f"s{r['seed']} {_pct(r['follows_annotation'])}" for r in rs)
            + f" | {_pct(min(r['follows_annotation'] for r in rs))} | "
            f"{_pct(min(r['annotation_closed'] for r in rs))} | {_pct(min(r['annotation_well_formed'] for r in rs))} | "
            + (f"{min(minutes):.1f}-{max(minutes):.1f}" if minutes else "n/a") + " | "
            + ", ".join(sorted({r.get("load_before", "n/a").split()[0] for r in rs})) + " |")
    return "\n".join(lines)


def write_table(out: str) -> str:
    """``OUT/binding.md`` from every finished point (written under a temporary name first); returns the table."""
    table = binding_table(finished_points(out))
    write_text(os.path.join(out, "binding.md"), table + "\n")
    return table
