#!/usr/bin/env python
"""Scale-out benchmark: preprocessing throughput with 2 workers against 1, measured in the same run.

Two ways of adding a worker are measured on the same corpus:
- ``tool``: ``tools/preprocess_data.py --workers 2`` against ``--workers 1`` (one machine, a process pool);
- ``ray``: ``tools/run_on_ray.py`` with 2 shards running at once on a local Ray instance (2 CPUs) against the same
  runner with 1 CPU (shards one after another), i.e. what adding a node does, on one machine. The runner's own
  shard time is compared (Ray's start-up, a fixed cost per job, is left out).
Target: >= 1.7x. Each configuration runs ``--repeat`` times, interleaved; the best time of each counts.

    python benchmarks/bench_scaleout.py --mb 20
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from bench_preprocess import make_corpus, preprocess_cmd  # noqa: E402


def timed(cmd, env=None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def ray_seconds(cmd, env) -> float:
    """The runner's own shard time (submit to merged output): Ray's start-up is a fixed cost, left out."""
    r = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    m = re.search(r"shards done in ([0-9.]+) s", r.stdout + r.stderr)
    if not m:
        raise RuntimeError("run_on_ray printed no summary:\n" + r.stderr[-2000:])
    return float(m.group(1))


def ray_cmd(inp, out, model):
    # The runner starts its own local Ray instance, capped by MEGATRON_ANCHOR_RAY_NUM_CPUS (set by the caller).
    return [sys.executable, os.path.join(REPO, "tools", "run_on_ray.py"), "--stage", "preprocess",
            "--num-shards", "2", "--no-progress", "--", "--input", inp, "--output-prefix", out,
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--append-eod"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20, help="annotated corpus size in MB")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    p.add_argument("--only", nargs="*", default=["tool", "ray"], help="which comparisons to run")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_scale_")
    try:
        corpus = os.path.join(tmp, "corpus.jsonl")
        make_corpus(corpus, args.mb)
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
                        "--output-prefix", os.path.join(tmp, "tok"), "--vocab-size", "8000",
                        "--max-bytes", "5000000"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        model = os.path.join(tmp, "tok.model")
        results = {"corpus_mb": args.mb, "cpus": os.cpu_count()}
        if "tool" in args.only:
            one, two = [], []
            for _ in range(args.repeat):
                one.append(timed(preprocess_cmd(corpus, os.path.join(tmp, "w1"), model, 1)))
                two.append(timed(preprocess_cmd(corpus, os.path.join(tmp, "w2"), model, 2)))
            results["tool"] = {"workers1_s": round(min(one), 2), "workers2_s": round(min(two), 2),
                               "speedup": round(min(one) / min(two), 3), "target": ">= 1.7"}
            print("tool", results["tool"], flush=True)
        if "ray" in args.only:
            one, two = [], []
            for i in range(args.repeat):
                for cpus, acc in ((1, one), (2, two)):
                    out = os.path.join(tmp, f"ray{cpus}_{i}")
                    env = dict(os.environ, MEGATRON_ANCHOR_RAY_NUM_CPUS=str(cpus))
                    acc.append(ray_seconds(ray_cmd(corpus, out, model), env))
            results["ray"] = {"cpus1_s": round(min(one), 2), "cpus2_s": round(min(two), 2),
                              "speedup": round(min(one) / min(two), 3), "target": ">= 1.7"}
            print("ray", results["ray"], flush=True)
        print(json.dumps(results, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
