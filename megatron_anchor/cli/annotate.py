#!/usr/bin/env python3
"""Annotate a JSONL corpus: every chunk gets ``<key>:<value>`` tags (see docs/annotator.md).

Examples:

    # embedded annotator, no server
    python tools/annotate.py --input raw.jsonl --output annotated.jsonl

    # vLLM replicas (OpenAI-compatible API), round-robin with failover; one request per document window
    python tools/annotate.py --annotator vllm --url http://node1:8000 --url http://node2:8000 \\
        --input raw.jsonl --output annotated.jsonl --concurrency 64

    # a distilled annotator (tools/distill_annotator.py) trained on an LLM-annotated sample: no server
    python tools/annotate.py --annotator distilled:tagger.npz --input raw.jsonl --output annotated.jsonl

Rerunning the same command after a kill resumes where the last checkpoint left off; nothing is lost or written
twice, and chunks already annotated come from the cache. Documents whose chunks could not be annotated go to
OUTPUT.failed.jsonl with the reasons; feed that file back as --input to retry them.

Exit status: 0 when the job completed (2 with --strict when some chunks failed), 1 on a usage or setup error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_anchor.annotation.budget import add_budget_arguments, budget_from_args
from megatron_anchor.annotation.annotate import annotate_file
from megatron_anchor.annotation.annotate_config import AnnotateConfig, AnnotateError, format_summary
from megatron_anchor.annotation.llm.client import API_KEY_ENV, ClientConfig, load_api_key
from megatron_anchor.annotation.llm.examples import ECHO_POLICIES
from megatron_anchor.annotation.llm.prompt import REQUEST_MODES
from megatron_anchor.annotation.llm.structured import STRUCTURED_MODES
from megatron_anchor.annotation.local import DISTILLED_PREFIX
from megatron_anchor.annotation.llm.tagschema import SchemaError
from megatron_anchor.bounds import field_argument, fields_from_args
from megatron_anchor.sharding import shard_path


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every flag documented in --help). A flag that sets a field of
    :class:`AnnotateConfig` or :class:`ClientConfig` is declared against that field (its type, range, default and
    ``dest`` come from the dataclass); :func:`main` builds both configs from the parsed fields."""
    d = ClientConfig(urls=[])
    a = AnnotateConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", "-i", type=Path, required=True, **field_argument(
        a, "input", "JSONL input: raw documents {\"text\": ...} (chunked at blank lines) or annotated-schema "
                    "documents whose chunks without tags get annotated"))
    io.add_argument("--output", "-o", type=Path, required=True, **field_argument(
        a, "output", "annotated JSONL output; OUTPUT.failed.jsonl, OUTPUT.progress.json and (by default) "
                     "OUTPUT.cache.sqlite are written beside it"))
    io.add_argument("--text-key", **field_argument(
        a, "text_key", f"field holding a raw document's text (default: {a.text_key})"))
    io.add_argument("--overwrite", **field_argument(
        a, "overwrite", "start from scratch, discarding the output and its checkpoint (the cache is kept)",
        action="store_true"))
    io.add_argument("--limit", **field_argument(a, "limit", "stop after this many input lines (for trials)"))
    io.add_argument("--checkpoint-every", metavar="SECONDS", **field_argument(
        a, "checkpoint_every_s", "seconds between checkpoints; each fsyncs the outputs (default: 2)"))
    io.add_argument("--no-progress", **field_argument(a, "progress", "no progress bar", action="store_false"))
    io.add_argument("--num-shards", **field_argument(
        a, "num_shards", "split the input into N byte-range shards (shard i owns the lines starting in bytes "
                         "[i*size/N, (i+1)*size/N)); this run writes only shard --shard-index, to "
                         "OUTPUT with .shardIIIII-of-NNNNN before its extension (side files named after it). "
                         "The shards' outputs concatenated in order equal an unsharded run's"))
    io.add_argument("--shard-index", **field_argument(
        a, "shard_index", "which shard to process (0-based); a rerun skips a finished shard and resumes a "
                          "half-written one"))
    io.add_argument("--strict", action="store_true", help="exit with status 2 when any chunk failed")

    ann = p.add_argument_group("annotator")
    ann.add_argument("--annotator", type=_annotator, metavar="{default,vllm,distilled:PATH}", **field_argument(
        a, "annotator", "default: the embedded annotator (no server, deterministic); vllm: OpenAI-compatible "
                        "servers given by --url; distilled:PATH: a model written by tools/distill_annotator.py "
                        "(no server; fast on CPU) (default: default)"))
    ann.add_argument("--schema", type=Path, metavar="SCHEMA", **field_argument(
        a, "schema_path", "tag schema YAML (keys, descriptions, aliases, limits); default: the packaged schema, or "
                          "for distilled:PATH the model's own (a given file must be the model's schema)"))
    ann.add_argument("--cache", type=Path, metavar="CACHE", **field_argument(
        a, "cache_path", "SQLite annotation cache keyed by model, prompt version and chunk hash; share one "
                         "file between runs to never pay twice (default: OUTPUT.cache.sqlite)"))
    ann.add_argument("--no-cache", **field_argument(
        a, "use_cache", "neither read nor write the cache", action="store_false"))
    add_budget_arguments(p.add_argument_group("annotation budget (see docs/data_formats.md)"))

    srv = p.add_argument_group("servers (--annotator vllm)")
    srv.add_argument("--url", action="append", default=[], metavar="URL",
                     help="a replica's base URL, e.g. http://127.0.0.1:8000 (repeat, or comma-separate, for "
                          "several; requests go round-robin and fail over)")
    srv.add_argument("--model", **field_argument(
        ClientConfig, "model", "served model name; default: the first model the first reachable replica lists"))
    srv.add_argument("--api-key-file", default=None,
                     help=f"file whose first line is the API key; otherwise ${API_KEY_ENV} is used if set. "
                          "The key is never printed")
    c = ClientConfig
    srv.add_argument("--concurrency", **field_argument(
        c, "concurrency", f"requests in flight over all replicas (default: {d.concurrency})"))
    srv.add_argument("--window", **field_argument(
        a, "window", "chunk requests queued before input reading pauses (default: 4 x concurrency)"))
    srv.add_argument("--timeout", metavar="SECONDS", **field_argument(
        c, "request_timeout_s", f"total time for one request before it is retried (default: {d.request_timeout_s:g})"))
    srv.add_argument("--connect-timeout", metavar="SECONDS", **field_argument(
        c, "connect_timeout_s", f"time to open a connection (default: {d.connect_timeout_s:g})"))
    srv.add_argument("--max-attempts", **field_argument(
        c, "max_attempts", "failed attempts (connection errors, timeouts, 429, 5xx) before a chunk fails "
                           f"(default: {d.max_attempts})"))
    srv.add_argument("--retry-budget", metavar="SECONDS", **field_argument(
        c, "retry_budget_s", "stop retrying a chunk this long after its first attempt (default: "
                             f"{d.retry_budget_s:g})"))
    srv.add_argument("--backoff-base", metavar="SECONDS", **field_argument(
        c, "backoff_base_s", f"first backoff ceiling, doubled per failure, with full jitter (default: "
                             f"{d.backoff_base_s:g})"))
    srv.add_argument("--backoff-max", metavar="SECONDS", **field_argument(
        c, "backoff_max_s", f"largest backoff ceiling (default: {d.backoff_max_s:g})"))
    srv.add_argument("--parse-retries", **field_argument(
        c, "parse_retries", f"re-asks when an answer has no usable tags (default: {d.parse_retries})"))
    srv.add_argument("--max-tokens", **field_argument(
        c, "max_tokens", f"generation cap per answer; per chunk in document mode (default: {d.max_tokens})"))
    srv.add_argument("--max-tokens-growth", metavar="N", **field_argument(
        c, "max_tokens_growth", "an answer cut at the cap is asked again (same temperature) with twice the cap, up "
                                f"to N times --max-tokens; its cut-off part is never used (default: "
                                f"{d.max_tokens_growth})"))
    srv.add_argument("--temperature", **field_argument(
        c, "temperature", f"sampling temperature of the first attempt (default: {d.temperature:g})"))
    srv.add_argument("--max-chunk-chars", **field_argument(
        c, "max_chunk_chars", f"chunks are clipped to this many characters in the prompt (default: "
                              f"{d.max_chunk_chars})"))
    srv.add_argument("--request-mode", choices=REQUEST_MODES, **field_argument(
                     c, "request_mode",
                     help="document: one request per window of a document's numbered chunks (the instructions "
                          "are paid once per window and tags see the document); chunk: one request per chunk "
                          f"(default: {d.request_mode})"))
    srv.add_argument("--window-chunks", **field_argument(
        c, "window_chunks", f"document mode: most chunks per request (default: {d.window_chunks})"))
    srv.add_argument("--window-chars", **field_argument(
        c, "window_chars", "document mode: most characters of chunk text per request; longer chunks go alone, "
                           f"clipped to it (default: {d.window_chars})"))
    srv.add_argument("--structured-output", choices=STRUCTURED_MODES, **field_argument(
                     c, "structured",
                     help="send the answer's JSON schema (response_format) so the server can only write parseable "
                          "answers: on, off (free text, tolerant parser), or auto (on until a server rejects the "
                          f"field) (default: {d.structured})"))
    srv.add_argument("--echo-policy", choices=ECHO_POLICIES, **field_argument(
                     c, "echo_policy",
                     help="tags that repeat the prompt's few-shot examples verbatim: reask (once, with other "
                          "examples; what still echoes is dropped), drop, or keep; counted in the summary either "
                          f"way (default: {d.echo_policy})"))
    return p


def _annotator(value: str) -> str:
    if value in ("default", "vllm") or (value.startswith(DISTILLED_PREFIX) and len(value) > len(DISTILLED_PREFIX)):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: choose default, vllm or distilled:PATH")


def _urls(raw: List[str]) -> List[str]:
    return [u.strip() for item in raw for u in item.split(",") if u.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the annotate job; returns the exit status."""
    args = build_parser().parse_args(argv)
    client = None
    if args.annotator == "vllm":
        urls = _urls(args.url)
        if not urls:
            print("annotate: --annotator vllm needs at least one --url", file=sys.stderr)
            return 1
        try:
            api_key = load_api_key(args.api_key_file)
        except ValueError as e:
            print(f"annotate: {e}", file=sys.stderr)
            return 1
        client = ClientConfig(**{**fields_from_args(ClientConfig, args), "urls": urls, "api_key": api_key})
    fields = fields_from_args(AnnotateConfig, args)
    if args.num_shards > 1:
        fields["output"] = Path(shard_path(str(args.output), args.num_shards, args.shard_index))
    config = AnnotateConfig(**{**fields, "client": client, "budget": budget_from_args(args)})
    try:
        stats = annotate_file(config)
    except (AnnotateError, SchemaError, ConnectionError) as e:
        print(f"annotate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"annotate: interrupted; {config.output} holds every document up to the checkpoint just written: "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    print(format_summary(stats, config), file=sys.stderr)
    return 2 if args.strict and stats.failed else 0


if __name__ == "__main__":
    sys.exit(main())
