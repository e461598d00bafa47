#!/usr/bin/env python3
"""Train a distilled annotator from a teacher-annotated sample, and report how close it comes to the teacher.

    # 1. the LLM annotator tags a sample of the corpus (e.g. 1-5% of its documents)
    python tools/annotate.py --annotator vllm --url http://127.0.0.1:8000 --input sample.jsonl --output teacher.jsonl
    # 2. distil it (held-out agreement and entropy are printed and stored in the model file)
    python tools/distill_annotator.py --teacher teacher.jsonl --output tagger.npz --report report.json
    # 3. the distilled annotator tags the corpus on CPU, in shards or on Ray like any annotator
    python tools/annotate.py --annotator distilled:tagger.npz --input corpus.jsonl --output annotated.jsonl

The keys learned are the tag schema's (``--schema``, default the packaged one) or those named by ``--keys``;
every one of them must occur in the teacher file. See docs/annotator.md ("The distilled annotator") for the
model family and why. Nothing is written unless training succeeds; the model file appears under its name only
when complete.

Exit status: 0 on success, 1 on bad input (the message names the file, line or key) or a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_anchor.annotation.distilled.features import FeatureConfig
from megatron_anchor.annotation.distilled.model import DECODES
from megatron_anchor.annotation.distilled.train import DistillConfig
from megatron_anchor.annotation.llm.tagschema import SchemaError, TagKey, TagSchema, load_schema
from megatron_anchor.bounds import argument
from megatron_anchor.outputs import check_outputs, write_json


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every flag documented in --help)."""
    d, f = DistillConfig(), FeatureConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True,
                   help="annotated JSONL from the teacher (tools/annotate.py output): every chunk must have tags")
    p.add_argument("--output", "-o", type=Path, required=True, help="the model file to write (.npz)")
    p.add_argument("--schema", type=Path, default=None,
                   help="tag schema YAML whose keys are learned and which the model's tags follow (default: the "
                        "packaged schema)")
    p.add_argument("--keys", default=None,
                   help="comma-separated keys to learn instead of all the schema's (keys the schema lacks are "
                        "learned as plain keys, e.g. the embedded annotator's 'length')")
    p.add_argument("--report", type=Path, default=None, help="also write the held-out report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    p.add_argument("--skip-bad-documents", action="store_true",
                   help="skip and count teacher documents that are malformed or not fully tagged, instead of "
                        "stopping at the first (the error names file and line)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log")
    m = p.add_argument_group("model and training")
    c = DistillConfig
    m.add_argument("--dim", **argument(c, "dim", f"width of the shared embedding (default: {d.dim})"))
    m.add_argument("--hash-bits", **argument(
        FeatureConfig, "hash_bits", f"2**BITS hashed n-gram features; the embedding table is 2**BITS x dim floats "
                                    f"(default: {f.hash_bits}, 64 MiB at dim 64)"))
    m.add_argument("--epochs", **argument(c, "epochs", f"most passes over the sample (default: {d.epochs})"))
    m.add_argument("--min-steps", **argument(
        c, "min_steps", f"optimizer steps before early stopping may end training (default: {d.min_steps})"))
    m.add_argument("--batch-size", **argument(c, "batch_size", f"chunks per step (default: {d.batch_size})"))
    m.add_argument("--lr", **argument(c, "lr", f"Adam learning rate of the heads (default: {d.lr:g})"))
    m.add_argument("--embedding-lr", **argument(
        c, "embedding_lr", f"SGD learning rate of the embedding, decayed linearly (default: {d.embedding_lr:g})"))
    m.add_argument("--max-classes", **argument(
        c, "max_classes", f"most distinct values learned per key (default: {d.max_classes})"))
    m.add_argument("--test-fraction", **argument(
        c, "test_fraction", f"share of documents held out for the report (default: {d.test_fraction:g})"))
    m.add_argument("--validation-fraction", **argument(
        c, "validation_fraction", f"share of documents for early stopping and temperature fitting (default: "
                                  f"{d.validation_fraction:g})"))
    m.add_argument("--extractive-share", **argument(
        c, "extractive_share", "a key gets an extractive head (copies spans of the chunk) when this share of its "
                               f"teacher items occur in their chunk (default: {d.extractive_share:g})"))
    m.add_argument("--decode", choices=DECODES, default=d.decode,
                   help="sample: each value drawn from the head at a temperature fitted to the teacher's entropy "
                        "(deterministic per chunk); argmax: the most likely value (default: sample)")
    m.add_argument("--seed", type=int, default=d.seed, help=f"split and initialisation seed (default: {d.seed})")
    return p


def resolve_schema(schema_path: Optional[Path], keys: Optional[str]) -> TagSchema:
    """The schema the model is trained for: ``schema_path``'s (or the packaged one), narrowed to ``keys``."""
    schema = load_schema(schema_path)
    if not keys:
        return schema
    names = [k.strip() for k in keys.split(",") if k.strip()]
    if len(set(names)) != len(names) or not names:
        raise SchemaError(f"--keys {keys!r}: give distinct, non-empty key names")
    known = {k.name: k for k in schema.keys}
    picked = tuple(known.get(n, TagKey(n)) for n in names)
    bad = [n for n in names if not n.isidentifier() or n.lower() != n]
    if bad:
        raise SchemaError(f"--keys: {', '.join(bad)} are not lower-case identifiers")
    return TagSchema(picked, schema.keep_unknown, schema.max_tags, schema.max_value_chars, schema.version)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train, report, write the model; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.output.exists() and not args.overwrite:
        print(f"distill_annotator: {args.output} exists (use --overwrite to replace it)", file=sys.stderr)
        return 1
    cfg = DistillConfig(dim=args.dim, epochs=args.epochs, min_steps=args.min_steps, batch_size=args.batch_size,
                        lr=args.lr, embedding_lr=args.embedding_lr, max_classes=args.max_classes,
                        test_fraction=args.test_fraction, validation_fraction=args.validation_fraction,
                        extractive_share=args.extractive_share, decode=args.decode, seed=args.seed,
                        features=FeatureConfig(hash_bits=args.hash_bits))
    try:
        cfg.check()
        check_outputs([("--output", args.output), ("--report", args.report)],
                      [("--teacher", args.teacher), ("--schema", args.schema)])
        schema = resolve_schema(args.schema, args.keys)
    except ValueError as e:  # bad settings, OutputError, SchemaError
        print(f"distill_annotator: {e}", file=sys.stderr)
        return 1
    from megatron_anchor.annotation.distilled.evaluate import format_report
    from megatron_anchor.annotation.distilled.train import distill, load_teacher

    log = (lambda s: None) if args.quiet else (lambda s: print(f"distill_annotator: {s}", file=sys.stderr))
    try:
        sample = load_teacher(args.teacher, [k.name for k in schema.keys], skip_bad=args.skip_bad_documents)
        if sample.skipped:
            print(f"distill_annotator: skipped {len(sample.skipped)} bad teacher documents, the first: "
                  f"{sample.skipped[0]}", file=sys.stderr)
        log(f"{len(sample)} teacher chunks from {args.teacher}; keys: {', '.join(k.name for k in schema.keys)}")
        model, report = distill(sample, schema, cfg, log)
    except ValueError as e:  # TeacherError, or settings that cannot train together
        print(f"distill_annotator: {e}", file=sys.stderr)
        return 1
    model.info["teacher"] = str(args.teacher)
    model.save(args.output)
    if args.report is not None:
        write_json(args.report, report, indent=2)
    if report:
        print(format_report(report))
    print(f"distill_annotator: wrote {args.output} ({args.output.stat().st_size / 2 ** 20:.1f} MiB); tag with "
          f"tools/annotate.py --annotator distilled:{args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
