"""Run a sharded data stage on a Ray cluster (a local instance here, a multi-node cluster unchanged).

Each shard is one Ray task that calls the stage's own tool, ``main(argv + ["--num-shards", N, "--shard-index",
i])``, so a shard's output is byte-for-byte what the single-machine tool writes for that shard. The tools are
resumable and mark finished shards, so a task that Ray retries after its worker died continues where it stopped,
and a rerun of the whole job skips finished shards. The driver collects per-shard statistics and failures
(with reasons), shows progress, and merges the shards in shard order when every one has finished.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """A data tool that can run as shards: its module, how to find a shard's outputs and statistics, and how to
    merge them."""

    module: str
    output_flag: str
    shard_output: Callable[[str, Dict[str, str], int, int], str]
    merge: Callable[[List[str], str], None]
    final_output: Callable[[str, Dict[str, str]], str]
    shard_stats: Callable[[str], Dict[str, object]]


def _preprocess_shard(out: str, opts: Dict[str, str], i: int, n: int) -> str:
    return f"{out}_{opts.get('--json-keys', 'text')}_document.shard{i:05d}-of-{n:05d}"


def _preprocess_final(out: str, opts: Dict[str, str]) -> str:
    return f"{out}_{opts.get('--json-keys', 'text')}_document"


def _merge_datasets(shards: List[str], out: str) -> None:
    from megatron_anchor.data.indexed import merge_token_role_datasets

    merge_token_role_datasets(shards, out)


def _preprocess_stats(shard: str) -> Dict[str, object]:
    with open(shard + ".done", encoding="utf-8") as f:
        return json.load(f)


def _annotate_shard(out: str, opts: Dict[str, str], i: int, n: int) -> str:
    from megatron_anchor.sharding import shard_path

    return shard_path(out, n, i)


def _annotate_stats(shard: str) -> Dict[str, object]:
    with open(shard + ".progress.json", encoding="utf-8") as f:
        state = json.load(f)
    if not state.get("complete"):
        raise RuntimeError(f"{shard} is not complete")
    return state["stats"]


def _merge_jsonl(shards: List[str], out: str) -> None:
    """Concatenate the shards' annotated outputs (and their failed-document files) in order, atomically."""
    from megatron_anchor.data.indexed import append_file

    from megatron_anchor.outputs import atomic_path

    for suffix in ("", ".failed.jsonl"):
        with atomic_path(out + suffix) as tmp, open(tmp, "wb", buffering=0) as dst:
            for shard in shards:
                append_file(shard + suffix, dst)


STAGES: Dict[str, Stage] = {
    "preprocess": Stage("megatron_anchor.cli.preprocess_data", "--output-prefix", _preprocess_shard,
                        _merge_datasets, _preprocess_final, _preprocess_stats),
    "preprocess_sft": Stage("megatron_anchor.cli.preprocess_sft", "--output-prefix", _preprocess_shard,
                            _merge_datasets, _preprocess_final, _preprocess_stats),
    "annotate": Stage("megatron_anchor.cli.annotate", "--output", _annotate_shard, _merge_jsonl,
                      lambda out, opts: out, _annotate_stats),
}
"""Stages the runner knows, by name."""


@dataclass
class ShardResult:
    """What the driver learns about one shard."""

    index: int
    ok: bool
    stats: Dict[str, object] = field(default_factory=dict)
    error: str = ""


@dataclass
class StageSummary:
    """Totals for a whole sharded run."""

    stage: str
    num_shards: int
    results: List[ShardResult]
    output: Optional[str]
    seconds: float

    @property
    def failed(self) -> List[ShardResult]:
        return [r for r in self.results if not r.ok]

    def lines(self) -> List[str]:
        ok = [r for r in self.results if r.ok]
        totals: Dict[str, int] = {}
        for r in ok:
            for k, v in r.stats.items():
                if isinstance(v, int):
                    totals[k] = totals.get(k, 0) + v
        out = [f"{self.stage}: {len(ok)}/{self.num_shards} shards done in {self.seconds:.1f} s"]
        if totals:
            out.append("  " + "  ".join(f"{k} {v:,}" for k, v in totals.items()))
        out += [f"  shard {r.index} FAILED: {r.error}" for r in self.failed]
        if self.output:
            out.append(f"  merged into {self.output}")
        return out


def _option_values(argv: Sequence[str]) -> Dict[str, str]:
    opts: Dict[str, str] = {}
    for i, a in enumerate(argv):
        if a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            opts[a] = argv[i + 1]
    return opts


def init_ray(address: Optional[str] = None, **kwargs) -> None:
    """Connect to (or start) Ray so that workers import this copy of ``megatron_anchor`` (checkout or install)."""
    import ray

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if address is None and "num_cpus" not in kwargs and os.environ.get("MEGATRON_ANCHOR_RAY_NUM_CPUS"):
        # Cap a local instance (benchmarks, shared machines); a cluster's size is its own business.
        kwargs["num_cpus"] = float(os.environ["MEGATRON_ANCHOR_RAY_NUM_CPUS"])
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}},
             **kwargs)


TRANSIENT_ERRORS = (sqlite3.OperationalError, ConnectionError, TimeoutError)
"""Errors from a shard task that a rerun can cure (a locked shared cache, an unreachable annotator server); Ray
retries a task that raises one of them, like one whose worker died."""


def run_shard(stage_name: str, argv: Sequence[str], index: int, num_shards: int) -> Dict[str, object]:
    """Run one shard in this process (what each Ray task does); returns the shard's statistics."""
    stage = STAGES[stage_name]
    tool = importlib.import_module(stage.module)
    rc = tool.main(list(argv) + ["--num-shards", str(num_shards), "--shard-index", str(index), "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"{stage.module} exited with status {rc} on shard {index} (its error is in the task log)")
    opts = _option_values(argv)
    return stage.shard_stats(stage.shard_output(opts[stage.output_flag], opts, index, num_shards))


def run_on_ray(stage_name: str, argv: Sequence[str], num_shards: int, address: Optional[str] = None,
               max_retries: int = 3, cpus_per_task: float = 1.0, merge: bool = True,
               show_progress: bool = True) -> StageSummary:
    """Fan ``num_shards`` shards of a stage out over Ray, wait, account, and merge in shard order.

    ``address``: an existing cluster (``"auto"`` or ``ray://host:port``); None starts a local instance.
    ``max_retries``: how often Ray reruns a shard whose worker process died or that failed with a transient
    error (:data:`TRANSIENT_ERRORS`); the tool resumes the shard where it stopped. A shard whose tool rejected
    its input fails at once, with the tool's reason.
    """
    import ray

    if stage_name not in STAGES:
        raise ValueError(f"unknown stage {stage_name!r}; choose one of {sorted(STAGES)}")
    stage = STAGES[stage_name]
    opts = _option_values(argv)
    if stage.output_flag not in opts:
        raise ValueError(f"the {stage_name} arguments need {stage.output_flag}")
    started_here = not ray.is_initialized()
    if started_here:
        init_ray(address)
    task = ray.remote(max_retries=max_retries, retry_exceptions=list(TRANSIENT_ERRORS),
                      num_cpus=cpus_per_task)(run_shard)
    start = time.time()
    futures = {task.remote(stage_name, list(argv), i, num_shards): i for i in range(num_shards)}
    results: Dict[int, ShardResult] = {}
    bar = tqdm(total=num_shards, desc=f"{stage_name} shards", unit="shard", disable=not show_progress)
    try:
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = futures[ref]
                try:
                    results[i] = ShardResult(i, True, ray.get(ref))
                except Exception as e:  # a task error after retries: record it, keep the other shards going
                    cause = getattr(e, "cause", None) or e
                    results[i] = ShardResult(i, False, error=f"{type(cause).__name__}: {cause}")
                bar.update(1)
    finally:
        bar.close()
        if started_here:
            ray.shutdown()
    ordered = [results[i] for i in range(num_shards)]
    output = None
    if merge and all(r.ok for r in ordered):
        out = opts[stage.output_flag]
        shards = [stage.shard_output(out, opts, i, num_shards) for i in range(num_shards)]
        output = stage.final_output(out, opts)
        stage.merge(shards, output)
    summary = StageSummary(stage_name, num_shards, ordered, output, time.time() - start)
    logger.info("\n".join(summary.lines()))
    return summary
