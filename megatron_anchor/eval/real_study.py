"""The real-text study's measurements: the annotator's tag distribution and cost, and the three models judged.

    python -m megatron_anchor.eval.real_study tags --work WORK          # WORK/tags.json
    python -m megatron_anchor.eval.real_study report --work WORK --base WORK/ck_base \\
        --standard WORK/ck_sft_standard --anchored WORK/ck_sft_anchored --judge-url URL --n 16 \\
        --temperatures 0.7 1.0 1.3                                       # report.json, report.md, pareto.png

``report`` samples N responses per held-out prompt (``WORK/data/prompts.jsonl``) from each model at each
temperature (base and anchored SFT write an annotation first, only the response is kept; standard SFT samples
plainly) and scores them with named judges, independent ones first:

- ``distinct-minilm`` / ``distinct-mpnet``: NoveltyBench's distinct classes under all-MiniLM-L6-v2 and under
  all-mpnet-base-v2, each with its cosine threshold calibrated on ``WORK/data/calibration.jsonl`` (held-out chunk
  pairs labelled by provenance: same document or not);
- ``embedding-minilm`` / ``embedding-mpnet``: mean pairwise cosine distance under each;
- ``llm`` (with ``--judge-url``): an LLM judge's attribute entropy (the Stories protocol) at the headline
  temperature, with its reliability on the labelled pairs (how often it gives both texts of a same-document pair
  the same value, against a different-document pair); independent unless it serves the training annotator's model;
- ``annotator``: the training annotator's tag entropy (the distilled model that tagged most of the corpus), last,
  not independent.

Quality: a fixed reference model's likelihood (the judge server's model; without one, the base checkpoint's).
Binding of anchored samples: ``follows ann.`` by the training annotator (the response's topic equals the sampled
one) and by all-mpnet-base-v2 (the response is closer to its own annotation than to the prompt's other ones;
:func:`megatron_anchor.eval.binding.embedding_follows`, 50% is chance). Ability: each checkpoint exported and
scored by lm-evaluation-harness on the held-out cloze task (``WORK/data/cloze.jsonl``). The share of the
base-to-standard gap closed by anchored SFT is reported per judge and checked against the targets
(:data:`TARGETS`). Time: models x temperatures x prompts x N samples, judged; memory: one sweep's samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from typing import Dict, List, Optional, Sequence

from megatron_anchor.eval.quickstart import MODELS, gap_closed

CLOZE_TASK = "real_text_cloze_mc"
"""The lm-eval task built from held-out sentences."""
EMBEDDERS = (("minilm", "all-MiniLM-L6-v2"), ("mpnet", "all-mpnet-base-v2"))
"""(judge suffix, model) of the two sentence-embedding judges."""
TARGETS = {"gap_closed": 0.70, "judges": 2, "follows": 0.80, "ability_points": 2.0}
"""The study's targets: anchored SFT closes >= 70% of the base-to-standard gap by at least two independent judges,
its responses follow their sampled annotation >= 80%, its ability within 2 points of standard SFT's."""
FOLLOWS = "follows_annotation"
FOLLOWS_EMB = "follows_annotation_mpnet"
STAGE_TIMES = "stage_times.tsv"
MAX_ANNOTATION_TOKENS = 64
"""Cap on a sampled annotation's tokens (the closing delimiter is forced there: the annotation is not closed)."""


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------------------------------
# The annotator: tag distribution and cost
# ------------------------------------------------------------------------------------------------------------

def tag_distribution(annotated: str) -> Dict:
    """Keys (share of chunks carrying each), distinct values and entropy (bits, over the chunks that carry the
    key) per key, and tags per chunk, of an annotated JSONL file (the annotate job's schema, or annotated SFT JSONL
    with an ``annotation`` per sample)."""
    from megatron_anchor.annotation.tag_entropy import shannon_entropy

    values: Dict[str, List[str]] = {}
    chunks = tags = 0
    with open(annotated, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            lists = [c.get("tags") for c in obj["chunks"]] if "chunks" in obj else [obj.get("annotation")]
            for tag_list in lists:
                if tag_list is None:
                    continue
                chunks += 1
                tags += len(tag_list)
                for k, v in {k: v for k, v in reversed(tag_list)}.items():
                    values.setdefault(k, []).append(str(v).strip().lower())
    keys = {k: {"share": len(vs) / chunks, "distinct": len(set(vs)), "entropy_bits": shannon_entropy(vs),
                "top": Counter(vs).most_common(3)} for k, vs in sorted(values.items(), key=lambda kv: -len(kv[1]))}
    return {"file": annotated, "chunks": chunks, "tags_per_chunk": tags / chunks if chunks else 0.0, "keys": keys}


def teacher_keys(annotated: str, min_count: int = 2) -> List[str]:
    """Keys the LLM wrote on at least ``min_count`` chunks of ``annotated``, most frequent first: what a distilled
    annotator can learn from it (a small sample rarely holds every key of the schema)."""
    dist = tag_distribution(annotated)
    return [k for k, v in dist["keys"].items() if v["share"] * dist["chunks"] >= min_count]


def annotate_cost(output: str) -> Dict:
    """What an annotate job cost, from its progress file: seconds, chunks, requests, generated tokens, echoes."""
    with open(output + ".progress.json", encoding="utf-8") as f:
        s = json.load(f)["stats"]
    return {"seconds": s["seconds"], "chunks": s["chunks"], "annotated": s["annotated"], "cached": s["cached"],
            "pretagged": s["pretagged"], "requests": s["requests"], "generated_tokens": s["tokens"],
            "failed": s["failed"], "echoed_tags": s["echoed"], "echo_reasked": s["echo_reasked"],
            "chunks_per_s": s["chunks"] / s["seconds"] if s["seconds"] else None}


def tag_report(work: str) -> Dict:
    """The tag distribution of the LLM's sample, of the SFT responses and of the whole annotated corpus, the
    few-shot echo rate, the distilled annotator's agreement with its teacher and the cost of each stage;
    written to ``WORK/tags.json``."""
    paths = {"llm_sample": os.path.join(work, "llm_sample.annotated.jsonl"),
             "sft_responses": os.path.join(work, "sft_anchored.sft_annotated.jsonl"),
             "corpus": os.path.join(work, "annotated.jsonl")}
    out: Dict = {"distribution": {k: tag_distribution(p) for k, p in paths.items() if os.path.exists(p)}, "cost": {}}
    jobs = {"llm_sample": paths["llm_sample"], "sft_responses": paths["sft_responses"] + ".job-output.jsonl",
            "distilled_corpus": paths["corpus"]}
    for name, job in jobs.items():
        if os.path.exists(job + ".progress.json"):
            out["cost"][name] = annotate_cost(job)
    llm = out["cost"].get("llm_sample")
    if llm and "llm_sample" in out["distribution"]:
        d = out["distribution"]["llm_sample"]
        total = d["tags_per_chunk"] * d["chunks"] + llm["echoed_tags"]  # echoed tags may have been dropped
        out["echo_rate"] = llm["echoed_tags"] / total if total else 0.0
    distill = os.path.join(work, "distill_report.json")
    if os.path.exists(distill):
        with open(distill, encoding="utf-8") as f:
            r = json.load(f)
        out["distilled"] = {"mean_agreement": r.get("mean_agreement"), "min_entropy_ratio": r.get("min_entropy_ratio"),
                            "held_out_chunks": r.get("chunks")}
    from megatron_anchor.outputs import write_json

    write_json(os.path.join(work, "tags.json"), out, indent=2)
    return out


def format_tags(tags: Dict) -> List[str]:
    """The tag report as Markdown lines."""
    lines = ["| tagged by | chunks | tags per chunk | keys (share of chunks: distinct values, entropy bits) |",
             "|---|---|---|---|"]
    for name, d in tags["distribution"].items():
        keys = "; ".join(f"{k} ({v['share']:.0%}: {v['distinct']}, {v['entropy_bits'] + 0.0:.1f})"
                         for k, v in list(d["keys"].items())[:8])
        lines.append(f"| {name} | {d['chunks']} | {d['tags_per_chunk']:.1f} | {keys} |")
    lines.append("")
    for name, c in tags["cost"].items():
        rate = f"{c['chunks_per_s']:.1f}" if c["chunks_per_s"] else "n/a"
        lines.append(f"- cost of {name}: {c['seconds']:.0f} s for {c['chunks']} chunks ({rate} chunks/s), "
                     f"{c['requests']} requests, {c['generated_tokens']} generated tokens, {c['failed']} failed")
    if "echo_rate" in tags:
        lines.append(f"- few-shot echo rate of the LLM's first answers: {tags['echo_rate']:.1%} of tags")
    if "distilled" in tags:
        d = tags["distilled"]
        lines.append(f"- distilled annotator against its teacher on {d['held_out_chunks']} held-out chunks: mean "
                     f"agreement {d['mean_agreement']:.2f}, smallest entropy ratio {d['min_entropy_ratio']:.2f}")
    return lines


# ------------------------------------------------------------------------------------------------------------
# Judges
# ------------------------------------------------------------------------------------------------------------

def distilled_extractor(model_path: str):
    """texts -> tags from the distilled annotator, each key's most likely value (a judge must be deterministic)."""
    from megatron_anchor.annotation.distilled.model import DistilledAnnotator

    model = DistilledAnnotator.load(model_path)

    def extract(texts: Sequence[str]) -> List[List[tuple]]:
        if not texts:
            return []
        values = model.predict_values(list(texts), decode="argmax")
        return [[(k, vs[i]) for k, vs in values.items() if vs[i]] for i in range(len(texts))]

    return model, extract


def llm_reliability(judge, pairs: Sequence[Dict], k: int) -> Dict:
    """How the LLM judge treats ``k`` same-document and ``k`` different-document labelled pairs: per attribute,
    the share of pairs given the same value (a judge that reads meaning agrees more often on same-document pairs),
    and the share of texts it gave no parseable answer for."""
    same = [p for p in pairs if p["same"]][:k]
    diff = [p for p in pairs if not p["same"]][:k]
    texts = [t for p in same + diff for t in (p["a"], p["b"])]
    before = len(judge.failures)
    tags = judge.extract(texts)
    rows = {}
    for attr in judge.attributes:
        vals = [dict((kk, v.strip().lower()) for kk, v in reversed(list(t))).get(attr, "<none>") for t in tags]
        agree = [vals[2 * i] == vals[2 * i + 1] and vals[2 * i] != "<none>" for i in range(len(vals) // 2)]
        rows[attr] = {"same_pairs_agree": _mean(agree[:len(same)]), "different_pairs_agree": _mean(agree[len(same):])}
    return {"pairs": [len(same), len(diff)], "attributes": rows,
            "unparsed_share": (len(judge.failures) - before) / len(texts) if texts else None}


def build_judges(shared: str, quality, embedders):
    """The embedding judges of the report (module docstring), each with its threshold calibrated on the labelled
    pairs; returns (judges, calibrations, pairs)."""
    from megatron_anchor.eval import judges as jg

    with open(os.path.join(shared, "data", "calibration.jsonl"), encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    same = [(p["a"], p["b"]) for p in pairs if p["same"]]
    diff = [(p["a"], p["b"]) for p in pairs if not p["same"]]
    out, calibrations = {}, {}
    for suffix, name in EMBEDDERS:
        cal = jg.calibrate_threshold(embedders[suffix], same, diff)
        calibrations[suffix] = {"model": name, **cal}
        out[f"distinct-{suffix}"] = jg.PartitionJudge(embedders[suffix], cal["threshold"], name,
                                                       quality if suffix == "mpnet" else None)
        out[f"embedding-{suffix}"] = jg.EmbeddingDistanceJudge(embedders[suffix], name)
    return out, calibrations, pairs


# ------------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------------

def run_report(work: str, checkpoints: Dict[str, str], n: int = 16, seed: int = 0, max_new_tokens: int = 64,
               temperatures: Sequence[float] = (1.0,), headline: float = 1.0, judge_url: Optional[str] = None,
               judge_samples: Optional[int] = None, reliability_pairs: int = 40, ability: bool = True,
               annotator_model: Optional[str] = None, threads: int = 1, shared: Optional[str] = None) -> Dict:
    """Sample, judge, export, measure ability; write ``WORK/report.json``, ``report.md``, ``pareto.png``.
    ``shared``: the folder holding the material (``data/``), the distilled annotator and the tag report, when the
    models' folder ``work`` is another (a run from an imported base beside the run from scratch)."""
    import torch

    from megatron_anchor.corpora.models import mpnet_folder
    from megatron_anchor.eval import ability as ab
    from megatron_anchor.eval import judges as jg
    from megatron_anchor.eval.binding import embedding_follows
    from megatron_anchor.eval.embed import load_embedder
    from megatron_anchor.eval.harness import FORMAT, ModelUnderTest, judge_records, study_sweep
    from megatron_anchor.eval.quickstart import _clean, quality_judge
    from megatron_anchor.inference import SamplingParams, read_prompts
    from megatron_anchor.inference.generator import load_from_checkpoint

    torch.set_num_threads(threads)
    shared = shared or work
    temperatures = sorted({*temperatures, headline})
    prompts = read_prompts(os.path.join(shared, "data", "prompts.jsonl"))
    gens = {name: load_from_checkpoint([], checkpoints[key]) for name, key, _ in MODELS}
    embedders = {"minilm": load_embedder(), "mpnet": load_embedder(mpnet_folder(), batch_size=16)}
    notes = []
    quality = quality_judge(judge_url, gens["base"], notes)
    judges, calibrations, pairs = build_judges(shared, quality, embedders)
    tagger, extract = distilled_extractor(os.path.join(shared, "distilled.npz"))
    judges["annotator"] = jg.AttributeJudge(extract, tuple(tagger.keys), "training annotator (distilled from the "
                                            "LLM annotator's tags)", independent=False)
    llm, reliability = None, None
    if judge_url:
        llm = jg.llm_attribute_judge([judge_url], jg.DEFAULT_ATTRIBUTES, cache_path=os.path.join(work, "judge.sqlite"))
        served = llm.judge_name.replace("LLM judge ", "")
        if annotator_model and served == annotator_model:
            llm.independent = False
            notes.append(f"the LLM judge serves {served}, the training annotator's model: not independent")
        reliability = llm_reliability(llm, pairs, reliability_pairs)
    params = SamplingParams(max_new_tokens=max_new_tokens, max_annotation_tokens=MAX_ANNOTATION_TOKENS)
    under_test = [ModelUnderTest(name, gens[name], mode) for name, _, mode in MODELS]
    measured = study_sweep(under_test, prompts, n, temperatures, headline, params, judges, quality, llm,
                           judge_samples, seed, _clean(gens["base"].template.assistant_suffix),
                           samples_out=os.path.join(work, "samples.jsonl"), extract_tags=lambda r: extract([r])[0])
    sweep, models = measured.rows, {}
    for name, key, mode in MODELS:
        rows, head = measured.samples[(name, headline)], measured.headline[name]
        entry = {"mode": mode, "checkpoint": checkpoints[key], "headline": head}
        if mode == "anchored":
            entry.update({k: head.get(f"{FORMAT}:{k}") for k in ("annotation_closed", "annotation_well_formed",
                                                                  FOLLOWS)})
            entry[FOLLOWS_EMB] = _mean([embedding_follows([r.get("annotation") for r in rs],
                                                          [r["response_judged"] for r in rs], embedders["mpnet"])
                                        for rs in rows])
        models[name] = entry
    if llm is not None and llm.failures:
        notes.append(f"LLM judge: {len(llm.failures)} texts without a parseable answer (counted as <none>)")
    all_judges = {**judges, **({"llm": llm} if llm else {})}
    report = {"prompts": len(prompts), "n": n, "temperatures": list(temperatures), "headline_temperature": headline,
              "judges": judge_records(all_judges, quality), "calibration": calibrations,
              "llm_reliability": reliability, "models": models, "sweep": sweep, "notes": notes}
    if ability:
        with open(os.path.join(shared, "data", "cloze.jsonl"), encoding="utf-8") as f:
            questions = [json.loads(line) for line in f if line.strip()]
        task_dir = ab.write_mc_task(os.path.join(work, "ability_task"), CLOZE_TASK, questions)
        from megatron_anchor.export import export_checkpoint

        for name, key, _ in MODELS:
            folder = os.path.join(work, "hf", key)
            export_checkpoint([], folder, load=checkpoints[key], overwrite=True)
            scores = ab.run_ability(folder, [CLOZE_TASK], include_path=task_dir)[CLOZE_TASK]
            models[name].update({"ability": scores["acc"], "ability_stderr": scores.get("acc_stderr"),
                                 "export": folder})
        report.update(ability_task=CLOZE_TASK, ability_n=len(questions))
    keys = [k for k in models["base"]["headline"] if ":" in k and not k.endswith("_well_formed")
            and not k.startswith(FORMAT) and k.split(":")[1] in ("distinct", "pairwise_distance",
                                                                 "attribute_entropy")]
    report["gap_closed"] = {k: gap_closed(*(models[m]["headline"].get(k) for m, _, _ in MODELS)) for k in keys}
    report["targets"] = check_targets(report)
    report["shared"] = shared
    _finish(work, report)
    return report


def check_targets(report: Dict) -> Dict:
    """Each target (:data:`TARGETS`) with the figure it is checked on and whether it is met."""
    independent = {j["id"] for j in report["judges"] if j["independent"]}
    heads = {m: report["models"][m]["headline"] for m in ("base", "standard-SFT")}
    # A judge counts only where standard SFT lost diversity by its measure (base above standard).
    closed = {k: v for k, v in report["gap_closed"].items() if k.split(":")[0] in independent and v is not None
              and heads["base"].get(k) is not None and heads["base"][k] > heads["standard-SFT"].get(k, math.inf)}
    meeting = sorted(k for k, v in closed.items() if v >= TARGETS["gap_closed"])
    anc, std = report["models"]["anchored-SFT"], report["models"]["standard-SFT"]
    ability_gap = None
    if anc.get("ability") is not None and std.get("ability") is not None:
        ability_gap = 100 * (std["ability"] - anc["ability"])
    return {
        "gap_closed": {"met": len(meeting) >= TARGETS["judges"], "judges_meeting": meeting,
                       "independent_gap_closed": closed},
        "follows": {"met": (anc.get(FOLLOWS) or 0) >= TARGETS["follows"], "value": anc.get(FOLLOWS),
                    "mpnet": anc.get(FOLLOWS_EMB)},
        "ability": {"met": ability_gap is not None and ability_gap <= TARGETS["ability_points"],
                    "points_below_standard": ability_gap},
    }


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_columns(report: Dict) -> List[tuple]:
    """(row key, header, format): the diversity judges (independent first, as ``report['judges']`` orders them),
    quality, ability and the anchored rows' format and binding."""
    head = report["models"]["base"]["headline"]
    cols = []
    for j in report["judges"]:
        for metric in ("distinct", "pairwise_distance", "attribute_entropy"):
            key = f"{j['id']}:{metric}"
            if any(key in m["headline"] for m in report["models"].values()) or key in head:
                label = {"distinct": "distinct", "pairwise_distance": "emb. distance",
                         "attribute_entropy": "entropy"}[metric]
                cols.append((key, f"{label} ({j['id']}{'' if j['independent'] else ', not indep.'})",
                             ".2f" if metric == "distinct" else ".3f"))
    cols += [("quality", "quality", ".2e"), ("ability", "ability", ".1%"),
             ("annotation_well_formed", "well formed", ".0%"), (FOLLOWS, "follows ann. (annotator)", ".0%"),
             (FOLLOWS_EMB, "follows ann. (mpnet)", ".0%")]
    return cols


def format_report(report: Dict, tags: Optional[Dict] = None, times: Optional[List[List[str]]] = None) -> str:
    """The report as Markdown: the table, the gap closed per judge, the targets, who each judge is, the
    calibration and the LLM judge's reliability, then (when given) the tag report and the stage times."""
    cols = table_columns(report)
    lines = [f"held-out prompts: {report['prompts']}, samples per prompt: {report['n']}, temperature "
             f"{report['headline_temperature']:g}", "",
             "| model | sampling | " + " | ".join(h for _, h, _ in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, m in report["models"].items():
        cells = [_fmt(m["headline"].get(k, m.get(k)), f) for k, _, f in cols]
        lines.append(f"| {name} | {m['mode']} | " + " | ".join(cells) + " |")
    lines += ["", "share of the base -> standard-SFT gap closed by anchored SFT: " + ", ".join(
        f"{k} {_fmt(v, '.0%')}" for k, v in report["gap_closed"].items())]
    t = report["targets"]
    lines.append(f"targets: >= {TARGETS['gap_closed']:.0%} of the gap by >= {TARGETS['judges']} independent judges "
                 "that saw standard SFT lose diversity: "
                 f"{'met' if t['gap_closed']['met'] else 'not met'} ({', '.join(t['gap_closed']['judges_meeting']) or 'none'});"
                 f" follows ann. >= {TARGETS['follows']:.0%}: {'met' if t['follows']['met'] else 'not met'} "
                 f"({_fmt(t['follows']['value'], '.0%')}); ability within {TARGETS['ability_points']:g} points of "
                 f"standard SFT: {'met' if t['ability']['met'] else 'not met'} "
                 f"({_fmt(t['ability']['points_below_standard'], '+.1f')} points below)")
    lines.append("judges: " + "; ".join(f"{j['id']} = {j['name']}" + ("" if j["independent"] else " (not independent)")
                                        for j in report["judges"]))
    for suffix, c in report["calibration"].items():
        lines.append(f"distinct-class threshold ({c['model']}): cosine {c['threshold']:.3f}, calibrated on "
                     f"{c['same_pairs']} + {c['different_pairs']} held-out chunk pairs labelled by provenance (same "
                     f"document or not; balanced accuracy {c['balanced_accuracy']:.3f})")
    rel = report.get("llm_reliability")
    if rel:
        lines.append(f"LLM judge reliability on {rel['pairs'][0]} same-document and {rel['pairs'][1]} "
                     "different-document pairs (share given the same value): " + ", ".join(
                         f"{a} {_fmt(r['same_pairs_agree'], '.0%')} vs {_fmt(r['different_pairs_agree'], '.0%')}"
                         for a, r in rel["attributes"].items()) + f"; unparsed {_fmt(rel['unparsed_share'], '.0%')}")
    if report.get("ability_task"):
        lines.append(f"ability: accuracy on {report['ability_task']} (lm-evaluation-harness, {report['ability_n']} "
                     "cloze questions from held-out sentences, 4 choices: 25% is chance)")
    lines.append("follows ann.: (annotator) the training annotator finds the sampled topic in the response; (mpnet) "
                 "the response is closer to its own annotation than to the prompt's other samples' (50% is chance)")
    lines += [f"note: {x}" for x in report.get("notes", [])]
    if tags:
        lines += ["", "### Tags", ""] + format_tags(tags)
    if times:
        lines += ["", "### Wall time per stage", "", "| stage | seconds | load average at start, end |", "|---|---|---|"]
        lines += [f"| {r[0]} | {r[1]} | {r[2]}, {r[3]} |" for r in times]
    return "\n".join(lines)


def read_times(work: str) -> List[List[str]]:
    """Rows of ``WORK/stage_times.tsv`` (stage, seconds, load average at start and end), as the script writes."""
    path = os.path.join(work, STAGE_TIMES)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.count("\t") == 3]


def plot_report(report: Dict, path: str) -> str:
    """Distinct classes under all-mpnet-base-v2 against quality over the temperature sweep, per model."""
    from megatron_anchor.eval import quickstart

    return quickstart.plot_report(report, path, "distinct-mpnet:distinct", "all-mpnet-base-v2",
                                  report["calibration"]["mpnet"]["threshold"], "Real text")


def _finish(work: str, report: Dict) -> None:
    from megatron_anchor.outputs import write_json

    plot_report(report, os.path.join(work, "pareto.png"))
    write_json(os.path.join(work, "report.json"), report, indent=2)
    write_markdown(work)


def write_markdown(work: str) -> str:
    """``WORK/report.md`` from ``report.json``, the tag report and the stage times, the shared stages' first
    (rerun after the last stage)."""
    from megatron_anchor.outputs import write_text

    with open(os.path.join(work, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    shared = report.get("shared") or work
    tags = None
    if os.path.exists(os.path.join(shared, "tags.json")):
        with open(os.path.join(shared, "tags.json"), encoding="utf-8") as f:
            tags = json.load(f)
    times = read_times(shared) + (read_times(work) if os.path.realpath(shared) != os.path.realpath(work) else [])
    text = format_report(report, tags, times) + "\n"
    write_text(os.path.join(work, "report.md"), text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    """``tags`` writes the tag report; ``report`` measures three checkpoints; ``markdown`` rewrites report.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tags", help="tag distribution, echo rate and cost of the annotation stages")
    t.add_argument("--work", required=True)
    k = sub.add_parser("teacher-keys", help="comma-separated keys the teacher file carries (for --keys)")
    k.add_argument("--teacher", required=True)
    k.add_argument("--min-count", type=int, default=2)
    m = sub.add_parser("markdown", help="rewrite WORK/report.md (with the stage times so far)")
    m.add_argument("--work", required=True)
    r = sub.add_parser("report", help="sample from three checkpoints, judge, export, measure ability")
    r.add_argument("--work", required=True, help="where the report goes (and its exports, samples, caches)")
    r.add_argument("--shared", default=None, help="the folder with data/, distilled.npz and tags.json (default: "
                                                  "--work)")
    r.add_argument("--base", required=True)
    r.add_argument("--standard", required=True)
    r.add_argument("--anchored", required=True)
    r.add_argument("--n", type=int, default=16, help="samples per prompt (default 16)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperatures", type=float, nargs="+", default=[1.0])
    r.add_argument("--judge-url", default=None, help="the LLM judge's server (also the quality reference)")
    r.add_argument("--judge-samples", type=int, default=None, help="LLM judge on the first K samples per prompt")
    r.add_argument("--reliability-pairs", type=int, default=40, help="labelled pairs of each kind for the LLM "
                                                                     "judge's reliability (default 40)")
    r.add_argument("--annotator-model", default=None, help="the training annotator's served model name")
    r.add_argument("--no-ability", action="store_true")
    r.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "tags":
        print("\n".join(format_tags(tag_report(args.work))))
        return 0
    if args.cmd == "teacher-keys":
        keys = teacher_keys(args.teacher, args.min_count)
        if not keys:
            print(f"real_study: {args.teacher}: no key occurs on {args.min_count} chunks", file=sys.stderr)
            return 1
        print(",".join(keys))
        return 0
    if args.cmd == "markdown":
        print(write_markdown(args.work))
        return 0
    run_report(args.work, {"base": args.base, "standard": args.standard, "anchored": args.anchored}, args.n,
               args.seed, args.max_new_tokens, args.temperatures, 1.0, args.judge_url, args.judge_samples,
               args.reliability_pairs, not args.no_ability, args.annotator_model, args.threads, args.shared)
    print(write_markdown(args.work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
