"""The quickstart's measurement: does anchored SFT keep the base model's diversity where standard SFT loses it,
and its ability?

    python -m megatron_anchor.eval.quickstart corpus --out-dir runs/qs --documents 6000 --sft-samples 600
    python -m megatron_anchor.eval.quickstart report --work runs/qs --base runs/qs/ck_base \\
        --standard runs/qs/ck_sft_standard --anchored runs/qs/ck_sft_anchored --n 32 --temperatures 0.7 1.0 1.3
    python -m megatron_anchor.eval.quickstart readme --work runs/qs      # README table + plot from report.json

``report`` samples N responses per held-out prompt from each model at each temperature (base and anchored SFT:
``anchored`` mode, only the response is kept; standard SFT: ``plain``), and scores them with named judges,
independent ones first (:mod:`megatron_anchor.eval.judges`):

- ``distinct``: NoveltyBench's equivalence classes under all-MiniLM-L6-v2 with a cosine threshold calibrated on
  labelled pairs of designed chunks that no model trained on or is scored against (one class = same topic
  and genre; :func:`megatron_anchor.data.demo_corpus.calibration_pairs`), and its
  utility with the quality judge;
- ``embedding``: mean pairwise cosine distance (all-MiniLM-L6-v2);
- ``llm`` (with ``--judge-url``): an LLM judge's attribute entropy (the Stories protocol), at the headline
  temperature;
- ``annotator``: the embedded annotator's tags, the annotator that wrote the training tags (not independent).

Quality: the likelihood of each response under a fixed reference model (the judge server's model with
``--judge-url``, else the base checkpoint), never the sampled model's own. Each checkpoint is exported to a
Hugging Face folder (``WORK/hf/NAME``) and lm-evaluation-harness measures ability on the designed multiple-choice
task (:mod:`megatron_anchor.eval.ability`). Also per model: the held-out response loss in its own training
format and, for anchored sampling, format and binding (:mod:`megatron_anchor.eval.binding`): the share of
annotations that closed by themselves, that are well formed (closed, parseable, the one serialisation of their
tags), and of responses on the sampled annotation's topic; and every judge again over the well-formed samples
only (broken outputs can inflate diversity). The share of the base-to-standard gap closed by anchored SFT is
reported per judge, over all samples and over well-formed samples only.
Writes ``WORK/report.json``, ``WORK/report.md``, ``WORK/samples.jsonl`` and ``WORK/pareto.png``.

The script's other stages (``knobs``, ``tokenizer-text``, ``split``) are :mod:`megatron_anchor.eval.quickstart_stages`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_anchor.annotation.default_annotator import annotate_text
from megatron_anchor.eval.quickstart_stages import check_knobs, number, split_flag, write_tokenizer_text
from megatron_anchor.roles import Role

RESPONSE_ROLES = (int(Role.RESPONSE), int(Role.EOD))
MODELS = (("base", "base", "anchored"), ("standard-SFT", "standard", "plain"), ("anchored-SFT", "anchored",
                                                                                "anchored"))
"""(report name, checkpoint key, sampling mode)."""
HEADLINE = (("distinct:distinct", "distinct classes"), ("embedding:pairwise_distance", "embedding distance"),
            ("llm:attribute_entropy", "LLM-judge attribute entropy"),
            ("annotator:attribute_entropy", "training-annotator tag entropy"),
            ("annotator:entropy_topic", "training-annotator topic entropy"))
"""Diversity columns of the table (judge:metric, header), independent judges first; gap closed per column."""
WELL_FORMED_GAP = ("distinct:distinct_fraction", "embedding:pairwise_distance", "annotator:attribute_entropy",
                   "annotator:entropy_topic")
"""Measures whose gap closed is also reported over well-formed samples only (the distinct count as a fraction:
prompts keep different numbers of well-formed samples)."""
FORMAT_KEYS = ("annotation_closed", "annotation_well_formed", "follows_annotation")
"""Format and binding shares copied onto each anchored model's row
(:func:`megatron_anchor.eval.harness.format_columns`)."""
MAX_ANNOTATION_TOKENS = 128
"""Cap on a sampled annotation's tokens (the closing delimiter is forced there and the annotation counts as not
closed)."""
README_BEGIN = "<!-- quickstart-table:begin -->"
README_END = "<!-- quickstart-table:end -->"
PLOT_IN_REPO = os.path.join("docs", "images", "quickstart_pareto.png")


def response_loss(gen, samples: Sequence[dict], annotated: bool) -> float:
    """Mean per-token cross-entropy (nats) over the RESPONSE and EOD tokens of SFT ``samples``.

    ``annotated``: format them with the annotator's tags of the response before it (as anchored SFT trains).
    """
    import torch

    from megatron_anchor.data.sft import SFTSample, Turn, sample_segments

    total, count = 0.0, 0
    for s in samples:
        turns = [Turn("user", s["prompt"]), Turn("assistant", s["response"], annotate_text(s["response"]))]
        segs = sample_segments(SFTSample(turns, dict(s)), gen.template, annotations=annotated,
                               eod=gen.tokenizer.eod_segment())
        (ids, roles), = gen.tokenizer.encode_segments([segs])
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]  # [1, T]
        with torch.no_grad():
            logits = gen.model(ids[:, :-1]).float()  # [1, T-1, V]
        nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="none")  # [T-1]
        mask = torch.as_tensor(np.isin(np.asarray(roles[1:]), RESPONSE_ROLES))
        total += float(nll[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)


def held_out_calibration(work: str) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """The labelled chunk pairs of the corpus's ``calibration.jsonl`` (written by the ``corpus`` stage from chunks
    that are in no training or reference file). The corpus is where ``WORK/prompts.jsonl`` lives (a run reusing
    a base links it); a corpus written before that file existed gets it now, from its own files."""
    from megatron_anchor.data import demo_corpus as dc
    from megatron_anchor.eval.judges import read_calibration_pairs

    corpus = os.path.dirname(os.path.realpath(os.path.join(work, "prompts.jsonl")))
    path = os.path.join(corpus, "calibration.jsonl")
    if not os.path.exists(path):
        dc.write_calibration(path, dc.corpus_chunks(corpus))
    return read_calibration_pairs(path)


def gap_closed(base: Optional[float], standard: Optional[float], anchored: Optional[float]) -> Optional[float]:
    """Share of the base-to-standard gap that anchored recovers (None when undefined or the gap is ~0)."""
    if None in (base, standard, anchored) or abs(base - standard) < 1e-9:
        return None
    return (anchored - standard) / (base - standard)


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_columns(report: Dict) -> List[Tuple[str, str, str]]:
    """(row key, header, format) of the table, from what the report holds: the diversity judges (independent
    first), quality, ability, loss and the annotation diagnostics. Other per-model measures add their keys to
    the model rows and a column here."""
    cols = [(key, header, ".2f" if key.startswith("distinct") else ".3f") for key, header in HEADLINE
            if any(key in m["headline"] for m in report["models"].values())]
    cols += [("quality", "quality", ".2e"), ("distinct:utility", "utility", ".2e"), ("ability", "ability", ".1%"),
             ("loss", "held-out loss", ".2f"), ("annotation_closed", "ann. closed", ".0%"),
             ("annotation_well_formed", "well formed", ".0%"), ("follows_annotation", "follows ann.", ".0%")]
    return cols


def _cell(model: Dict, key: str):
    for place in (model.get("headline", {}), model):
        if key in place:
            return place[key]
    return None


def format_table(report: Dict) -> str:
    """The report as a Markdown table with the judges named under it (every number comes from ``report``)."""
    cols = table_columns(report)
    t = report["headline_temperature"]
    lines = [f"held-out prompts: {report['prompts']}, samples per prompt: {report['n']}, temperature {t:g}", "",
             "| model | sampling | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['mode']} | " + " | ".join(_fmt(_cell(m, k), f) for k, _, f in cols) + " |")
    g = report["gap_closed"]
    lines += ["", "share of the base -> standard-SFT gap closed by anchored SFT: " + ", ".join(
        f"{h} {_fmt(g.get(k), '.0%')}" for k, h in HEADLINE if k in g)]
    wf = report.get("gap_closed_well_formed") or {}
    if wf:
        names = {**dict(HEADLINE), "distinct:distinct_fraction": "distinct classes (as a share of the samples)"}
        lines.append("the same over well-formed samples only: " + ", ".join(
            f"{names.get(k, k)} {_fmt(v, '.0%')}" for k, v in wf.items()))
    lines.append("judges: " + "; ".join(f"{j['id']} = {j['name']}" + ("" if j["independent"] else
                                                                       " (not independent)")
                                        for j in report["judges"]))
    cal = report["calibration"]
    lines.append(f"distinct-class threshold: cosine {cal['threshold']:.3f}, calibrated on {cal['same_pairs']} + "
                 f"{cal['different_pairs']} labelled chunk pairs (balanced accuracy {cal['balanced_accuracy']:.3f})")
    if report.get("ability_task"):
        lines.append(f"ability: accuracy on {report['ability_task']} (lm-evaluation-harness, {report['ability_n']} "
                     "questions); loss: held-out response cross-entropy in each model's own training format "
                     "(not comparable across rows)")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _clean(template_suffix: str):
    # A turn ends at the template's end-of-turn text ("\n\n" for the plain template, the end of a chunk). The
    # sampler stops at end-of-document only; a model that goes on writes the next chunk (for the base model: the
    # next chunk's annotation as plain text, since delimiters are banned in responses).
    end = template_suffix or "\n\n"
    return lambda text: text.split(end)[0].strip()


def quality_judge(judge_url: Optional[str], base, notes: List[str]):
    """The quality judge: the per-token likelihood under the judge server's model, or without a server under the
    base checkpoint's generator ``base`` (then a line saying so goes to ``notes``)."""
    from megatron_anchor.eval import judges as jg

    if judge_url:
        fn, ref_name = jg.server_reference(judge_url)
        return jg.ReferenceLikelihood(fn, f"reference likelihood ({ref_name})")
    notes.append("no --judge-url: quality is the base checkpoint's likelihood, which favours base-like text; "
                 "with a judge server it is an independent model's")
    return jg.ReferenceLikelihood(jg.decoder_reference(base), "reference likelihood (base checkpoint)")


def run_report(work: str, checkpoints: Dict[str, str], n: int = 32, seed: int = 0, max_new_tokens: int = 32,
               temperatures: Sequence[float] = (1.0,), headline: float = 1.0, judge_url: Optional[str] = None,
               judge_samples: Optional[int] = None, ability: bool = True, ability_n: int = 200,
               threads: int = 1) -> Dict:
    """Sample, judge, export, measure ability; write ``WORK/report.json``, ``report.md`` and ``pareto.png``."""
    import torch

    from megatron_anchor.eval import ability as ab
    from megatron_anchor.eval import judges as jg
    from megatron_anchor.eval.embed import load_embedder
    from megatron_anchor.eval.harness import FORMAT, WELL_FORMED, ModelUnderTest, judge_records, study_sweep
    from megatron_anchor.export import export_checkpoint
    from megatron_anchor.inference import SamplingParams, read_prompts
    from megatron_anchor.inference.generator import load_from_checkpoint

    # One thread: on a shared 2-core machine, OpenMP threads that contend with other processes made every
    # decoding step several times slower.
    torch.set_num_threads(threads)
    if headline not in temperatures:
        temperatures = sorted({*temperatures, headline})
    prompts = read_prompts(os.path.join(work, "prompts.jsonl"))
    with open(os.path.join(work, "sft_heldout.jsonl"), encoding="utf-8") as f:
        heldout = [json.loads(line) for line in f if line.strip()]
    gens = {name: load_from_checkpoint([], checkpoints[key]) for name, key, _ in MODELS}
    embed = load_embedder()
    calibration = jg.calibrate_threshold(embed, *held_out_calibration(work))
    notes = []
    quality = quality_judge(judge_url, gens["base"], notes)
    judges = {"distinct": jg.PartitionJudge(embed, calibration["threshold"], quality=quality),
              "embedding": jg.EmbeddingDistanceJudge(embed), "annotator": jg.training_annotator_judge()}
    llm = jg.llm_attribute_judge([judge_url], jg.DEFAULT_ATTRIBUTES, cache_path=os.path.join(work, "judge.sqlite")) \
        if judge_url else None
    params = SamplingParams(max_new_tokens=max_new_tokens, max_annotation_tokens=MAX_ANNOTATION_TOKENS)
    under_test = [ModelUnderTest(name, gens[name], mode) for name, _, mode in MODELS]
    measured = study_sweep(under_test, prompts, n, temperatures, headline, params, judges, quality, llm,
                           judge_samples, seed, _clean(gens["base"].template.assistant_suffix),
                           samples_out=os.path.join(work, "samples.jsonl"))
    sweep, models = measured.rows, {}
    for name, key, mode in MODELS:
        head = measured.headline[name]
        models[name] = {"mode": mode, "checkpoint": checkpoints[key], "headline": head,
                        "loss": response_loss(gens[name], heldout, annotated=mode == "anchored"),
                        **{k: head[f"{FORMAT}:{k}"] for k in FORMAT_KEYS if f"{FORMAT}:{k}" in head}}
    if llm is not None and llm.failures:
        notes.append(f"LLM judge: {len(llm.failures)} responses without a parseable answer (counted as <none>)")
    report = {"prompts": len(prompts), "n": n, "temperatures": list(temperatures), "headline_temperature": headline,
              "judges": judge_records({**judges, **({"llm": llm} if llm else {})}, quality),
              "calibration": calibration, "models": models, "sweep": sweep, "notes": notes}
    if ability:
        task_dir = ab.write_demo_task(os.path.join(work, "ability_task"), n=ability_n)
        for name, key, _ in MODELS:
            folder = os.path.join(work, "hf", key)
            export_checkpoint([], folder, load=checkpoints[key], overwrite=True)
            scores = ab.run_ability(folder, [ab.DEMO_TASK], include_path=task_dir)[ab.DEMO_TASK]
            models[name].update({"ability": scores["acc"], "ability_stderr": scores.get("acc_stderr"),
                                 "export": folder})
        report.update(ability_task=ab.DEMO_TASK, ability_n=ability_n)
    report["gap_closed"] = {k: gap_closed(*(models[m]["headline"].get(k) for m, _, _ in MODELS))
                            for k, _ in HEADLINE if k in models["base"]["headline"]}
    report["gap_closed_well_formed"] = {
        k: gap_closed(*(models[m]["headline"].get(k + WELL_FORMED) for m, _, _ in MODELS))
        for k in WELL_FORMED_GAP if k + WELL_FORMED in models["base"]["headline"]}
    plot_report(report, os.path.join(work, "pareto.png"))
    _write(os.path.join(work, "report.json"), json.dumps(report, indent=2))
    _write(os.path.join(work, "report.md"), format_table(report) + "\n")
    return report


def measure_binding(work: str, checkpoint: str, n: int = 32, seed: int = 0, temperature: float = 1.0,
                    max_new_tokens: int = 32, threads: int = 1) -> Dict:
    """How well a checkpoint binds text to its annotation: N anchored samples per held-out prompt (the report's
    sampling), and the shares of annotations closed and well formed and of responses following them
    (:mod:`megatron_anchor.eval.binding`); written to ``WORK/binding.json``. Time: prompts x N samples."""
    import torch

    from megatron_anchor.eval.harness import FORMAT, ModelUnderTest, format_columns, sample_sweep
    from megatron_anchor.inference import SamplingParams, read_prompts
    from megatron_anchor.inference.generator import load_from_checkpoint

    torch.set_num_threads(threads)
    prompts = read_prompts(os.path.join(work, "prompts.jsonl"))
    gen = load_from_checkpoint([], checkpoint)
    params = SamplingParams(max_new_tokens=max_new_tokens, max_annotation_tokens=MAX_ANNOTATION_TOKENS)
    rows = sample_sweep([ModelUnderTest("base", gen, "anchored")], prompts, n, [temperature], params, seed,
                        _clean(gen.template.assistant_suffix))[("base", temperature)]
    shares = {k[len(FORMAT) + 1:]: v for k, v in format_columns(rows).items()}
    result = {"checkpoint": checkpoint, "prompts": len(prompts), "n": n, "temperature": temperature, **shares}
    _write(os.path.join(work, "binding.json"), json.dumps(result, indent=2))
    return result


def plot_report(report: Dict, path: str, diversity: str = "distinct:distinct", embedder: str = "MiniLM",
                threshold: Optional[float] = None, study: str = "Quickstart") -> str:
    """The Pareto plot of a report's sweep: distinct classes (the ``diversity`` column of the calibrated embedding
    judge; ``threshold`` defaults to the report's calibration) against quality."""
    from megatron_anchor.eval.harness import QUALITY, plot_pareto

    names = {j["id"]: j["name"] for j in report["judges"]}
    threshold = report["calibration"]["threshold"] if threshold is None else threshold
    return plot_pareto(report["sweep"], path, diversity,
                       diversity_label=f"distinct classes of {report['n']} ({embedder}, cosine >= {threshold:.2f})",
                       quality_label=f"quality: {names[QUALITY]}, per-token probability",
                       title=f"{study}: diversity against quality, temperatures " +
                             ", ".join(f"{t:g}" for t in report["temperatures"]))


def _write(path: str, text: str) -> None:
    from megatron_anchor.outputs import write_text

    write_text(path, text)


def update_readme(work: str, readme: str = "README.md", repo: str = ".") -> str:
    """Put ``WORK/report.md`` between the README's quickstart markers and ``WORK/pareto.png`` at
    :data:`PLOT_IN_REPO`; returns the README path."""
    with open(os.path.join(work, "report.md"), encoding="utf-8") as f:
        table = f.read().strip()
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} markers to put the table between")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    _write(readme, f"{head}{README_BEGIN}\n{table}\n{README_END}{tail}")
    os.makedirs(os.path.join(repo, os.path.dirname(PLOT_IN_REPO)), exist_ok=True)
    shutil.copyfile(os.path.join(work, "pareto.png"), os.path.join(repo, PLOT_IN_REPO))
    return readme


def _arg(parse: Callable[[str], object]):
    """An argparse type from a knob parser (argparse shows an ArgumentTypeError's own words)."""
    def arg(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return arg


def _at_least(low: int):
    return _arg(number(int, low))


_positive_float = _arg(number(float, 0.0, low_open=True))


def check_report_inputs(work: str, n: int, temperatures: Sequence[float]) -> List[str]:
    """What a ``report`` run would do, after checking the corpus files it reads (prompts, held-out references,
    calibration pairs); raises ValueError naming a missing or bad file. The ``--dry-run`` of ``report``."""
    from megatron_anchor.inference import read_prompts

    prompts = read_prompts(os.path.join(work, "prompts.jsonl"))
    path = os.path.join(work, "sft_heldout.jsonl")
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            if line.strip() and not {"prompt", "response"} <= set(json.loads(line)):
                raise ValueError(f"{path}:{k}: needs 'prompt' and 'response'")
    same, different = held_out_calibration(work)
    return [f"{len(prompts)} held-out prompts x {n} samples x {len(temperatures)} temperatures "
            f"({', '.join(f'{x:g}' for x in temperatures)}) from each of {', '.join(m for m, _, _ in MODELS)}",
            f"distinct-class threshold from {len(same)} + {len(different)} held-out chunk pairs"]


def main(argv: Optional[List[str]] = None) -> int:
    """``corpus`` writes the designed corpus; ``split`` gives a dataset's ``--split``; ``report`` measures three
    checkpoints (``--dry-run``: checks its inputs); ``readme`` updates README."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="write raw.jsonl, sft.jsonl, sft_heldout.jsonl, prompts.jsonl, "
                                      "calibration.jsonl")
    c.add_argument("--out-dir", required=True)
    c.add_argument("--documents", type=_at_least(1), default=6000)
    c.add_argument("--sft-samples", type=_at_least(1), default=600)
    c.add_argument("--instruction-share", type=float, default=0.1)
    c.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("tokenizer-text", help="tokenizer training text with the annotations' text included")
    t.add_argument("--annotated", required=True)
    t.add_argument("--output", required=True)
    k = sub.add_parser("knobs", help="check the script's settings (NAME=VALUE ...); exit 2 naming each bad one")
    k.add_argument("settings", nargs="*", metavar="NAME=VALUE")
    s = sub.add_parser("split", help="print the trainer's --split for a dataset: about 2%% of its sequences (at "
                                     "least one) for validation, none when it has too few (said on stderr)")
    s.add_argument("--data", required=True, help="dataset prefix (PREFIX_text_document)")
    r = sub.add_parser("report", help="sample from three checkpoints, judge, export, measure ability")
    r.add_argument("--work", required=True, help="the corpus directory (prompts.jsonl, sft_heldout.jsonl)")
    r.add_argument("--base", required=True, help="base (pretraining) checkpoint directory")
    r.add_argument("--standard", required=True, help="standard-SFT checkpoint directory")
    r.add_argument("--anchored", required=True, help="anchored-SFT checkpoint directory")
    r.add_argument("--n", type=_at_least(2), default=32,
                   help="samples per held-out prompt (default 32; at least 2: diversity compares samples)")
    r.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i (default 0)")
    r.add_argument("--max-new-tokens", type=int, default=32, help="cap on response tokens (default 32)")
    r.add_argument("--temperatures", type=_positive_float, nargs="+", default=[1.0],
                   help="temperature sweep for the Pareto plot (default 1.0)")
    r.add_argument("--headline-temperature", type=_positive_float, default=1.0,
                   help="the temperature of the table and the gap closed (default 1.0)")
    r.add_argument("--judge-url", default=None,
                   help="OpenAI-compatible server (vLLM) of the LLM judge, also the quality reference model")
    r.add_argument("--judge-samples", type=_at_least(1), default=None,
                   help="LLM judge on the first K samples of each prompt only (default: all)")
    r.add_argument("--no-ability", action="store_true", help="skip the export and the lm-eval ability task")
    r.add_argument("--ability-questions", type=_at_least(1), default=200,
                   help="questions of the ability task (200)")
    r.add_argument("--threads", type=_at_least(1), default=1, help="torch threads for sampling (default 1)")
    r.add_argument("--dry-run", action="store_true",
                   help="check the corpus files and flags, print what would run, and exit (no checkpoint read)")
    b = sub.add_parser("binding", help="anchored samples from one checkpoint on the held-out prompts: shares of "
                                       "annotations closed and well formed and of responses following them")
    b.add_argument("--work", required=True, help="the corpus directory (prompts.jsonl)")
    b.add_argument("--checkpoint", required=True, help="checkpoint directory")
    b.add_argument("--n", type=_at_least(1), default=32, help="samples per held-out prompt (default 32)")
    b.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses seed + i (default 0)")
    d = sub.add_parser("readme", help="put WORK/report.md into README.md and WORK/pareto.png into docs/images")
    d.add_argument("--work", required=True)
    d.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    if args.cmd == "corpus":
        from megatron_anchor.data.demo_corpus import write_demo_corpus

        os.makedirs(args.out_dir, exist_ok=True)
        paths = write_demo_corpus(args.out_dir, args.documents, args.sft_samples, args.seed, args.instruction_share)
        print(json.dumps(paths))
        return 0
    if args.cmd == "tokenizer-text":
        print(f"wrote {write_tokenizer_text(args.annotated, args.output)} documents to {args.output}")
        return 0
    if args.cmd == "readme":
        print(f"updated {update_readme(args.work, args.readme, os.path.dirname(os.path.abspath(args.readme)))}")
        return 0
    if args.cmd == "knobs":
        values = dict(s.partition("=")[::2] for s in args.settings)
        errors = check_knobs(values)
        for e in errors:
            print(f"quickstart: error: {e}", file=sys.stderr)
        return 2 if errors else 0
    if args.cmd == "binding":
        print(json.dumps(measure_binding(args.work, args.checkpoint, args.n, args.seed)))
        return 0
    if args.cmd == "split":
        split, what = split_flag(args.data)
        print(what, file=sys.stderr)
        print(split)
        return 0
    if args.dry_run:
        temperatures = sorted({*args.temperatures, args.headline_temperature})
        for line in check_report_inputs(args.work, args.n, temperatures):
            print(f"report (dry run): {line}")
        return 0
    report = run_report(args.work, {"base": args.base, "standard": args.standard, "anchored": args.anchored},
                        args.n, args.seed, args.max_new_tokens, args.temperatures, args.headline_temperature,
                        args.judge_url, args.judge_samples, not args.no_ability, args.ability_questions, args.threads)
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
