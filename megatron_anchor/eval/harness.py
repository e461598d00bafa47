"""The evaluation loop: models x temperatures x prompts -> N samples each -> judges -> table and Pareto plot.

Every diversity column is ``JUDGE:METRIC`` and the table's ``judges`` record says who each judge is (its full
name, whether it is independent of the training annotator); the quality column is a judge too. The sampled
model's own likelihood is never used as quality. For anchored sampling the table also gets format and binding
(``format:*`` columns, :mod:`megatron_anchor.eval.binding`) and every judge's metrics over the well-formed samples
only (``JUDGE:METRIC_well_formed``): broken outputs must not pass for diversity.
Sampling goes through any engine with ``generate_many``
(:class:`~megatron_anchor.inference.generator.AnchorGenerator`, or vLLM:
:class:`~megatron_anchor.inference.vllm_engine.VllmGenerator`).
Time: models x temperatures x (sampling + judging) of prompts x N responses; memory: one sweep's responses.
"""

from __future__ import annotations

import contextlib
import csv
import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.eval import binding
from megatron_anchor.eval.judges import DiversityJudge, QualityJudge
from megatron_anchor.eval.metrics import pareto_front
from megatron_anchor.inference.prompts import Prompt
from megatron_anchor.inference.sampler import SamplingParams
from megatron_anchor.outputs import atomic_path, atomic_write, write_json

BASE_COLUMNS = ("model", "mode", "temperature", "prompts", "samples")
QUALITY = "quality"
"""The quality column (its judge is named in the table's ``judges`` record)."""
FORMAT = "format"
"""Prefix of the format and binding columns (:func:`format_columns`)."""
WELL_FORMED = "_well_formed"
"""Suffix of a judge's metric computed over the well-formed samples only (:func:`well_formed_responses`)."""


@dataclass
class ModelUnderTest:
    """A named generator and how it samples."""

    name: str
    generator: object
    mode: str = "anchored"


def named_values(values: Optional[Sequence[str]], flag: str) -> Dict[str, str]:
    """``NAME=VALUE`` flag values (``--model base=hf/base``) as a dict; a malformed one, or a name given twice
    (the second would silently replace the first), is a ValueError naming ``flag``."""
    out = {}
    for v in values or []:
        name, eq, rest = v.partition("=")
        if not eq or not name or not rest:
            raise ValueError(f"{flag} expects NAME=VALUE, got {v!r}")
        if name in out:
            raise ValueError(f"{flag} {name} is given twice ({out[name]!r} and {rest!r}); names must be distinct")
        out[name] = rest
    return out


def order_judges(judges: Dict[str, DiversityJudge]) -> Dict[str, DiversityJudge]:
    """Independent judges first (reports lead with them), the training annotator after."""
    return dict(sorted(judges.items(), key=lambda kv: not kv[1].independent))


def judge_records(judges: Dict[str, DiversityJudge], quality: Optional[QualityJudge]) -> List[Dict]:
    """Who each column's judge is, for the table and every report."""
    out = [{"id": jid, "name": j.name, "independent": j.independent, "metrics": list(j.metrics)}
           for jid, j in order_judges(judges).items()]
    if quality is not None:
        out.append({"id": QUALITY, "name": quality.name, "independent": True, "metrics": ["score"]})
    return out


def judge_responses(prompts: Sequence[str], responses: Sequence[Sequence[str]], judges: Dict[str, DiversityJudge],
                    quality: Optional[QualityJudge] = None) -> Dict[str, float]:
    """``JUDGE:METRIC`` -> mean over prompts (every metric a judge returns, per-attribute ones included), and
    ``quality`` -> mean quality over all responses."""
    row: Dict[str, float] = {}
    for jid, judge in order_judges(judges).items():
        per_prompt = judge.score_many(prompts, responses)
        for metric in per_prompt[0] if per_prompt else ():
            row[f"{jid}:{metric}"] = float(np.mean([p[metric] for p in per_prompt]))
    if quality is not None:
        scores = [s for p, rs in zip(prompts, responses) for s in quality.scores(p, rs)]
        row[QUALITY] = float(np.mean(scores)) if scores else float("nan")
    return row


def format_columns(rows: Sequence[Sequence[Dict]], extract_tags: Optional[Callable[[str], list]] = None,
                   follow_keys: Sequence[str] = binding.FOLLOW_KEYS) -> Dict[str, Optional[float]]:
    """``format:annotation_closed``, ``format:annotation_well_formed`` and ``format:follows_annotation`` over
    the samples (rows per prompt, as :func:`sample_sweep` returns them) that carry a sampled annotation; ``{}``
    when none does (plain sampling). Whether a response follows its annotation is judged on the tags
    ``extract_tags`` finds in it (default: the embedded annotator, the one that wrote the training tags)."""
    flat = [r for rs in rows for r in rs]
    if not any(r.get("annotation") is not None for r in flat):
        return {}
    if extract_tags is None:
        from megatron_anchor.annotation.default_annotator import annotate_text as extract_tags
    shares = binding.binding([r.get("annotation") for r in flat], [extract_tags(r["response_judged"]) for r in flat],
                             follow_keys)
    return {f"{FORMAT}:{k}": v for k, v in shares.items()}


def well_formed_responses(prompts: Sequence[str], rows: Sequence[Sequence[Dict]]):
    """``(prompts, responses)`` restricted to well-formed samples, leaving out prompts with fewer than two; None
    when every sample is well formed (the full-set figures then stand for both)."""
    keep = [binding.well_formed_mask([r.get("annotation") for r in rs]) for rs in rows]
    if all(all(k) for k in keep):
        return None
    kept = [(p, [r["response_judged"] for r, k in zip(rs, ks) if k]) for p, rs, ks in zip(prompts, rows, keep)]
    kept = [(p, rs) for p, rs in kept if len(rs) >= 2]
    return [p for p, _ in kept], [rs for _, rs in kept]


def judge_rows(prompts: Sequence[str], rows: Sequence[Sequence[Dict]], judges: Dict[str, DiversityJudge],
               quality: Optional[QualityJudge] = None, extract_tags: Optional[Callable[[str], list]] = None,
               follow_keys: Sequence[str] = binding.FOLLOW_KEYS) -> Dict[str, Optional[float]]:
    """Everything one (model, temperature) cell of the table holds: :func:`judge_responses` over all samples,
    the same judges over the well-formed samples only (``..._well_formed``; a sample without an annotation
    counts as well formed; None when no prompt keeps two samples) and :func:`format_columns`."""
    responses = [[r["response_judged"] for r in rs] for rs in rows]
    out: Dict[str, Optional[float]] = dict(judge_responses(prompts, responses, judges, quality))
    subset = well_formed_responses(prompts, rows)
    if subset is None:  # every sample well formed (plain sampling always is): the same figures
        kept = {k: v for k, v in out.items() if k != QUALITY}
    elif subset[0]:
        kept = judge_responses(subset[0], subset[1], judges)
    else:
        kept = {k: None for k in out if k != QUALITY}
    out.update({k + WELL_FORMED: v for k, v in kept.items()})
    out.update(format_columns(rows, extract_tags, follow_keys))
    return out


def sample_sweep(models: Sequence[ModelUnderTest], prompts: Sequence[Prompt], n: int, temperatures: Sequence[float],
                 params: SamplingParams, seed: int = 0, clean: Callable[[str], str] = str,
                 samples_out: Optional[str] = None) -> Dict[Tuple[str, float], List[List[Dict]]]:
    """``(model, temperature) -> sample rows per prompt``, each row with ``response_judged`` (the response
    ``clean`` made, what judges see); every sample is also written to ``samples_out`` (JSONL). Prompt i uses
    seed + i at every temperature, as tools/generate.py does."""
    out: Dict[Tuple[str, float], List[List[Dict]]] = {}
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(atomic_write(samples_out)) if samples_out else None  # renamed when complete
        for m in models:
            for temp in temperatures:
                p = SamplingParams(**{**params.__dict__, "temperature": temp})
                rows = m.generator.generate_many(prompts, [q.n or n for q in prompts], m.mode, p,
                                                 [seed + i for i in range(len(prompts))])
                for rs in rows:
                    for r in rs:
                        r["response_judged"] = clean(r["response"])
                out[(m.name, temp)] = rows
                if sink:
                    for prompt, rs in zip(prompts, rows):
                        for j, r in enumerate(rs):
                            sink.write(json.dumps({"model": m.name, "temperature": temp, "id": prompt.id,
                                                   "sample": j, "prompt": prompt.text, **r},
                                                  ensure_ascii=False) + "\n")
    return out


def run_sweep(models: Sequence[ModelUnderTest], prompts: Sequence[Prompt], n: int, temperatures: Sequence[float],
              params: SamplingParams, judges: Dict[str, DiversityJudge], quality: Optional[QualityJudge] = None,
              seed: int = 0, clean: Callable[[str], str] = str, samples_out: Optional[str] = None,
              extract_tags: Optional[Callable[[str], list]] = None,
              follow_keys: Sequence[str] = binding.FOLLOW_KEYS) -> List[Dict[str, object]]:
    """One row per (model, temperature): :func:`judge_rows` (every judge's metrics averaged over prompts, over
    all and over well-formed samples; quality; format and binding)."""
    samples = sample_sweep(models, prompts, n, temperatures, params, seed, clean, samples_out)
    return _judge_sweep(models, prompts, temperatures, samples, judges, quality, extract_tags, follow_keys)


def _judge_sweep(models, prompts, temperatures, samples, judges, quality, extract_tags, follow_keys):
    texts = [p.text for p in prompts]
    rows = []
    for m in models:
        for temp in temperatures:
            cell = samples[(m.name, temp)]
            rows.append({"model": m.name, "mode": m.mode, "temperature": temp, "prompts": len(prompts),
                         "samples": sum(len(r) for r in cell),
                         **judge_rows(texts, cell, judges, quality, extract_tags, follow_keys)})
    return rows


@dataclass
class StudySweep:
    """What :func:`study_sweep` measured: the samples, one row per (model, temperature) and, per model, its row
    at the headline temperature with the LLM judge's columns added."""

    samples: Dict[Tuple[str, float], List[List[Dict]]]
    rows: List[Dict[str, object]]
    headline: Dict[str, Dict[str, object]]


def study_sweep(models: Sequence[ModelUnderTest], prompts: Sequence[Prompt], n: int, temperatures: Sequence[float],
                headline: float, params: SamplingParams, judges: Dict[str, DiversityJudge],
                quality: Optional[QualityJudge] = None, llm: Optional[DiversityJudge] = None,
                llm_samples: Optional[int] = None, seed: int = 0, clean: Callable[[str], str] = str,
                samples_out: Optional[str] = None, extract_tags: Optional[Callable[[str], list]] = None,
                follow_keys: Sequence[str] = binding.FOLLOW_KEYS) -> StudySweep:
    """:func:`run_sweep` over ``temperatures`` (which must hold ``headline``), then the LLM judge ``llm`` (when
    given) on the first ``llm_samples`` responses per prompt (all when None) of each model at the headline
    temperature only: it costs one request per response. Time and memory as :func:`run_sweep`, plus models x
    prompts x ``llm_samples`` judge requests."""
    samples = sample_sweep(models, prompts, n, temperatures, params, seed, clean, samples_out)
    rows = _judge_sweep(models, prompts, temperatures, samples, judges, quality, extract_tags, follow_keys)
    texts = [p.text for p in prompts]
    heads: Dict[str, Dict[str, object]] = {}
    for m in models:
        head = dict(next(r for r in rows if r["model"] == m.name and r["temperature"] == headline))
        if llm is not None:
            subset = [[r["response_judged"] for r in rs][:llm_samples] for rs in samples[(m.name, headline)]]
            head.update(judge_responses(texts, subset, {"llm": llm}))
        heads[m.name] = head
    return StudySweep(samples, rows, heads)


def write_table(rows: Sequence[Dict[str, object]], out_prefix: str, judges: Sequence[Dict]) -> List[str]:
    """``PREFIX.json`` (rows and the judge records) and ``PREFIX.csv``; returns the paths."""
    columns = list(BASE_COLUMNS) + sorted({k for r in rows for k in r} - set(BASE_COLUMNS),
                                          key=lambda k: (k == QUALITY, k))
    write_json(out_prefix + ".json", {"columns": columns, "judges": list(judges), "rows": list(rows)}, indent=2)
    with atomic_write(out_prefix + ".csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in columns})
    return [out_prefix + ".json", out_prefix + ".csv"]


def plot_pareto(rows: Sequence[Dict[str, object]], path: str, diversity: str, quality: str = QUALITY,
                diversity_label: str = "", quality_label: str = "", title: str = "") -> str:
    """Scatter of quality (x) against diversity (y) per model over the temperature sweep, each model's Pareto
    front (both maximised) drawn as a line, points labelled by temperature; the axis labels name the judges."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 5.0))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(r[quality], r[diversity], r["temperature"]) for r in rows
               if r["model"] == name and r.get(quality) is not None and r.get(diversity) is not None]
        if not pts:
            continue
        sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=name, alpha=0.8)
        for x, y, t in pts:
            ax.annotate(f"T={t:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = pareto_front([(p[0], p[1]) for p in pts])
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color=sc.get_facecolor()[0], linewidth=1.5)
    ax.set_xlabel(quality_label or quality)
    ax.set_ylabel(diversity_label or diversity)
    ax.set_title(title or "Diversity against quality over a temperature sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:  # the suffix tells matplotlib the format
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path
