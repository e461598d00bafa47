"""Ability through lm-evaluation-harness (``lm-eval``), on exported folders, offline.

The paper's claim has two halves: diversity is kept *and* ability is kept. Ability is measured with the harness
users already trust, on the folder :mod:`megatron_anchor.export` writes, with transformers (``hf``) or a vLLM
server (``server``: lm-eval's ``local-completions`` model, log-likelihoods from ``echo`` + ``logprobs``, the
requests sent as token ids so they are tokenized by the folder's own tokenizer).

Task definitions come from local YAML files (``include_path``), so it runs with no network:
:func:`write_demo_task` builds a multiple-choice task from the quickstart's designed corpus. For real runs, the
paper reports a zero-shot average over standard tasks plus GSM8k; lm-eval's names for that set are
:data:`PAPER_TASKS` (their datasets download from the Hugging Face hub on first use).
Cost: one forward pass per (question, choice) for multiple-choice tasks; memory: the model plus one batch.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional, Sequence

DEMO_TASK = "anchor_demo_topic_mc"
"""The quickstart's local multiple-choice task (see :func:`write_demo_task`)."""

PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "winogrande", "openbookqa", "sciq",
               "lambada_openai", "gsm8k")
"""lm-eval task names for the paper's kind of ability suite: zero-shot multiple choice (ARC, BoolQ, HellaSwag,
PIQA, WinoGrande, OpenBookQA, SciQ, LAMBADA) and GSM8k (generative; use ``--num-fewshot 5`` as usual)."""

BACKENDS = ("hf", "server")

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def demo_questions(n: int = 200, seed: int = 12345, choices: int = 4) -> List[Dict]:
    """Multiple-choice questions from the designed corpus, on whether a model keeps a text on its topic.

    A chunk is cut right after its first topic word; the right continuation is the chunk's own, which holds two
    more words of that topic; each wrong one swaps *one* of those two words for a word of another topic (all else
    identical), so a model must notice a single word that does not belong. ``seed`` differs from the corpus's,
    so the chunks are new combinations (their vocabulary is not)."""
    from megatron_anchor.data import demo_corpus as dc

    rng = random.Random(seed)
    topics = list(dc.TOPICS)
    out = []
    while len(out) < n:
        topic, genre = rng.choice(topics), rng.choice(list(dc.TEMPLATES))
        text = dc.chunk(rng, topic, genre)
        spans = sorted((text.find(f" {w}") + 1, w) for w in dc.TOPICS[topic] if f" {w}" in text)
        if len(spans) != 3 or any(text.count(f" {w}") != 1 for _, w in spans):
            continue  # a word that occurs twice would make the swap ambiguous
        (first, w1), rest = spans[0], spans[1:]
        context, tail = text[:first + len(w1)], text[first + len(w1):]
        wrong = []
        for t in rng.sample([t for t in topics if t != topic], choices - 1):
            _, word = rng.choice(rest)
            wrong.append(tail.replace(f" {word}", f" {rng.choice(dc.TOPICS[t])}", 1))
        options = [tail] + wrong
        order = list(range(choices))
        rng.shuffle(order)
        out.append({"context": context, "choices": [options[i] for i in order], "label": order.index(0),
                    "topic": topic, "genre": genre})
    return out


def write_mc_task(out_dir: str, task: str, questions: Sequence[Dict]) -> str:
    """Write a local multiple-choice task (``TASK.yaml`` + its JSONL of ``{"context", "choices", "label"}``) into
    ``out_dir``; returns the folder (an ``include_path`` for lm-eval)."""
    from megatron_anchor.outputs import atomic_write, write_text

    data = os.path.abspath(os.path.join(out_dir, task + ".jsonl"))
    with atomic_write(data) as f:
        for q in questions:
            f.write(json.dumps(q) + "\n")
    write_text(os.path.join(out_dir, task + ".yaml"), _YAML.format(task=task, data=json.dumps(data)))
    return out_dir


def write_demo_task(out_dir: str, n: int = 200, seed: int = 12345) -> str:
    """Write the demo task (``DEMO_TASK.yaml`` + its JSONL) into ``out_dir``; returns the folder (an
    ``include_path`` for lm-eval)."""
    return write_mc_task(out_dir, DEMO_TASK, demo_questions(n, seed))


def _model_args(backend: str, folder: str, url: Optional[str], batch_size: int) -> tuple:
    if backend == "hf":
        return "hf", {"pretrained": folder, "dtype": "float32"}
    if backend == "server":
        if not url:
            raise ValueError("the server backend needs the URL of a vLLM server serving the folder")
        from megatron_anchor.inference.vllm_engine import ServerBackend

        served = ServerBackend(url)
        base = served.url + "/v1/completions"
        return "local-completions", {"model": served.model, "base_url": base, "tokenizer": folder,
                                     "tokenizer_backend": "huggingface", "tokenized_requests": True,
                                     "num_concurrent": 8, "max_retries": 3}
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def run_ability(folder: str, tasks: Sequence[str], include_path: Optional[str] = None, backend: str = "hf",
                url: Optional[str] = None, batch_size: int = 16, limit: Optional[int] = None,
                num_fewshot: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval for an exported folder (metrics as lm-eval names them, e.g.
    ``acc``, ``acc_stderr``, ``acc_norm``)."""
    local_only = bool(include_path) and set(tasks) <= _local_tasks(include_path)
    if local_only:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")  # local tasks only: never reach for the hub
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}: no config.json (export the checkpoint with tools/export_hf.py)")
    model, args = _model_args(backend, folder, url, batch_size)
    # Indexing lm-eval's thousands of built-in task files takes seconds: skipped when only local tasks run.
    manager = TaskManager(include_path=include_path, include_defaults=not local_only)
    unknown = sorted(set(tasks) - set(manager.match_tasks(list(tasks))))
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's tasks"
                         + (f" or those in {include_path}" if include_path else "") + " (lm_eval --tasks list)")
    out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=list(tasks), task_manager=manager,
                                  device="cpu" if backend == "hf" else None, batch_size=batch_size, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000)
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                         if isinstance(v, (int, float)) and "," in k}
    return results


def _local_tasks(include_path: str) -> set:
    names = set()
    for name in os.listdir(include_path):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(include_path, name), encoding="utf-8") as f:
                for line in f:
                    if line.startswith("task:"):
                        names.add(line.split(":", 1)[1].strip())
    return names
