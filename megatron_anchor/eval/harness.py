"""The evaluation loop: models x temperatures x prompts -> N samples each -> metrics -> table and Pareto plot."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from megatron_anchor.eval import binding
from megatron_anchor.eval.metrics import (
    distinct_count,
    judge_score,
    mean_log_likelihood,
    mean_pairwise_cosine_distance,
    pareto_front,
    semantic_entropy,
)
from megatron_anchor.inference.prompts import Prompt
from megatron_anchor.inference.sampler import SamplingParams

COLUMNS = ("model", "mode", "temperature", "prompts", "samples", "semantic_entropy", "pairwise_distance",
           "distinct_count", "distinct_fraction", "log_likelihood", "judge", "annotation_well_formed",
           "follows_annotation", "semantic_entropy_well_formed", "pairwise_distance_well_formed")


@dataclass
class ModelUnderTest:
    """A named generator, how it samples, and (optionally) a reference model for the likelihood proxy."""

    name: str
    generator: object
    mode: str = "anchored"


def evaluate_prompt(prompt: Prompt, responses: Sequence[str], extract_tags: Callable[[str], list],
                    embed: Optional[Callable], threshold: float, reference=None,
                    judge: Optional[Callable[[str, str], float]] = None,
                    annotations: Optional[Sequence[Optional[dict]]] = None,
                    follow_keys: Sequence[str] = binding.FOLLOW_KEYS) -> Dict[str, object]:
    """All metrics for one prompt's responses; ``annotations``: each sample's sampled annotation (anchored
    sampling), for format, binding and the well-formed-only diversity (:mod:`megatron_anchor.eval.binding`)."""
    tags = [extract_tags(r) for r in responses]
    row: Dict[str, object] = {"semantic_entropy": semantic_entropy(tags)["score"]}
    emb = embed(list(responses)) if embed is not None else None
    if emb is not None:
        row["pairwise_distance"] = mean_pairwise_cosine_distance(emb)
        dc = distinct_count(emb, threshold)
    else:
        row["pairwise_distance"] = None
        dc = distinct_count(texts=responses)
    annotations = list(annotations) if annotations is not None else [None] * len(responses)
    shares = binding.binding(annotations, tags, follow_keys)
    row["annotation_well_formed"] = shares["annotation_well_formed"]
    row["follows_annotation"] = shares["follows_annotation"]
    kept = binding.diversity(tags, emb, keep=binding.well_formed_mask(annotations)) or {}
    row["semantic_entropy_well_formed"] = kept.get("semantic_entropy")
    row["pairwise_distance_well_formed"] = kept.get("pairwise_distance")
    row["distinct_count"], row["distinct_fraction"] = dc["count"], dc["fraction"]
    row["log_likelihood"] = (mean_log_likelihood([reference.response_logprobs(prompt, r) for r in responses])
                             if reference is not None else None)
    row["judge"] = judge_score(judge, prompt.text, responses)
    return row


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(np.mean(vals)) if vals else None


def run_sweep(models: Sequence[ModelUnderTest], prompts: Sequence[Prompt], n: int, temperatures: Sequence[float],
              params: SamplingParams, extract_tags: Callable[[str], list], embed: Optional[Callable] = None,
              threshold: float = 0.9, reference=None, judge=None, seed: int = 0,
              samples_out: Optional[str] = None,
              follow_keys: Sequence[str] = binding.FOLLOW_KEYS) -> List[Dict[str, object]]:
    """One table row per (model, temperature): metrics averaged over prompts. ``reference``: the generator whose
    likelihood scores responses (None: each model scores its own). Samples are appended to ``samples_out``.
    ``follow_keys``: the attributes a response must share with its sampled annotation to follow it."""
    rows = []
    if samples_out:
        os.makedirs(os.path.dirname(os.path.abspath(samples_out)), exist_ok=True)
    sink = open(samples_out, "w", encoding="utf-8") if samples_out else None  # noqa: SIM115
    try:
        for m in models:
            for temp in temperatures:
                p = SamplingParams(**{**params.__dict__, "temperature": temp})
                per_prompt = []
                for i, prompt in enumerate(prompts):
                    outs = m.generator.generate(prompt, prompt.n or n, m.mode, p, seed=seed + i)
                    responses = [o["response"] for o in outs]
                    per_prompt.append(evaluate_prompt(prompt, responses, extract_tags, embed, threshold,
                                                      reference or m.generator, judge,
                                                      [o.get("annotation") for o in outs], follow_keys))
                    if sink:
                        for j, o in enumerate(outs):
                            sink.write(json.dumps({"model": m.name, "temperature": temp, "id": prompt.id,
                                                   "sample": j, **o}, ensure_ascii=False) + "\n")
                row = {"model": m.name, "mode": m.mode, "temperature": temp, "prompts": len(prompts),
                       "samples": sum(prompt.n or n for prompt in prompts)}
                for key in COLUMNS[5:]:
                    row[key] = _mean(r[key] for r in per_prompt)
                rows.append(row)
    finally:
        if sink:
            sink.close()
    return rows


def write_table(rows: Sequence[Dict[str, object]], out_prefix: str) -> List[str]:
    """``PREFIX.json`` and ``PREFIX.csv``; returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    with open(out_prefix + ".json", "w", encoding="utf-8") as f:
        json.dump({"columns": list(COLUMNS), "rows": list(rows)}, f, indent=2)
    with open(out_prefix + ".csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in COLUMNS})
    return [out_prefix + ".json", out_prefix + ".csv"]


def plot_pareto(rows: Sequence[Dict[str, object]], path: str, diversity: str = "pairwise_distance",
                quality: str = "log_likelihood") -> str:
    """Scatter of quality (x) against diversity (y) per model over the temperature sweep, with each model's
    Pareto front (both maximised) drawn as a line and points labelled by temperature."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(r[quality], r[diversity], r["temperature"]) for r in rows
               if r["model"] == name and r.get(quality) is not None and r.get(diversity) is not None]
        if not pts:
            continue
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=name, alpha=0.7)
        for x, y, t in pts:
            ax.annotate(f"T={t:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(p[0], p[1]) for p in pts])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color=sc.get_facecolor()[0], linewidth=1.5)
    ax.set_xlabel(quality.replace("_", " "))
    ax.set_ylabel(diversity.replace("_", " "))
    ax.set_title("Diversity-quality Pareto front per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
