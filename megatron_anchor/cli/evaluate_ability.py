"""Ability of exported models through lm-evaluation-harness (lm-eval), offline with local task files.

    python tools/evaluate_ability.py --model base=hf/base --model anchored=hf/anchored \\
        --demo-task tasks/ --output results/ability.json
    python tools/evaluate_ability.py --model anchored=hf/anchored --tasks arc_easy hellaswag boolq \\
        --output results/ability.json                                   # lm-eval's own tasks (hub datasets)
    python tools/evaluate_ability.py --model anchored=hf/anchored --backend server \\
        --url anchored=http://127.0.0.1:8000 --demo-task tasks/ --output results/ability.json

A model is NAME=FOLDER, a folder written by tools/export_hf.py. Backends: hf (transformers, CPU) or server (a
vLLM server serving the folder, through lm-eval's local-completions model; --url NAME=URL). --demo-task DIR
writes the designed multiple-choice task (anchor_demo_topic_mc) into DIR and runs it; --include-path adds
folders of your own task YAML files. The paper's kind of suite, by lm-eval name: arc_easy arc_challenge boolq
hellaswag piqa winogrande openbookqa sciq lambada_openai, and gsm8k (generative, usually --num-fewshot 5).
Writes one JSON file: {model: {task: {metric: value}}}, lm-eval's metric names (acc, acc_stderr, acc_norm, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from megatron_anchor.bounds import ranged
from megatron_anchor.eval.harness import named_values
from megatron_anchor.outputs import check_outputs, write_json


def build_parser() -> argparse.ArgumentParser:
    """The tool's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="NAME=FOLDER (exported), repeatable")
    p.add_argument("--tasks", nargs="*", default=[], help="lm-eval task names (local or lm-eval's own)")
    p.add_argument("--demo-task", default=None, metavar="DIR",
                   help="write the designed multiple-choice task into DIR and run it")
    p.add_argument("--demo-questions", default=200, **ranged(int, "questions of the demo task (default 200)", ge=1))
    p.add_argument("--include-path", default=None, help="folder of local task YAML files")
    p.add_argument("--backend", choices=("hf", "server"), default="hf",
                   help="hf: transformers in this process (default); server: a vLLM server per model (--url)")
    p.add_argument("--url", action="append", default=[], help="NAME=URL of the vLLM server serving model NAME")
    p.add_argument("--batch-size", default=16, **ranged(int, "requests per batch (default 16)", ge=1))
    p.add_argument("--limit", default=None, **ranged(int, "only the first N examples of each task (checks)", ge=1))
    p.add_argument("--num-fewshot", default=None, **ranged(int, "few-shot examples (default: the task's)", ge=0))
    p.add_argument("--output", required=True, help="JSON file to write the results to")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run lm-eval on every model; returns 0, or 2 on bad input."""
    from megatron_anchor.eval.ability import DEMO_TASK, run_ability, write_demo_task
    from megatron_anchor.inference.vllm_engine import VllmError

    args = build_parser().parse_args(argv)
    try:
        check_outputs([("--output", args.output)])
        models = named_values(args.model, "--model")
        urls = named_values(args.url, "--url")
        tasks = list(args.tasks)
        include = args.include_path
        for name, folder in models.items():
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise FileNotFoundError(f"--model {name}={folder}: no config.json (export it with "
                                        "tools/export_hf.py)")
            if args.backend == "server" and name not in urls:
                raise ValueError(f"--backend server needs --url {name}=URL")
        if args.demo_task:
            write_demo_task(args.demo_task, n=args.demo_questions)
            if include and os.path.abspath(include) != os.path.abspath(args.demo_task):
                raise ValueError("give --demo-task or --include-path as the local task folder, not two folders "
                                 "(put your YAML files beside the demo task)")
            include = args.demo_task
            tasks.append(DEMO_TASK)
        if not tasks:
            raise ValueError("no tasks: pass --tasks and/or --demo-task")
        results = {name: run_ability(folder, tasks, include, args.backend, urls.get(name), args.batch_size,
                                     args.limit, args.num_fewshot)
                   for name, folder in models.items()}
    except (ValueError, FileNotFoundError, VllmError) as exc:  # OutputError is a ValueError
        print(f"evaluate_ability.py: error: {exc}", file=sys.stderr)
        return 2
    write_json(args.output, results, indent=2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
