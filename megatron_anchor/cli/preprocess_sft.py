#!/usr/bin/env python
"""Preprocess SFT JSONL into Megatron indexed datasets with a per-token role channel (see docs/sft.md).

Each sample is written as prompt, annotation, response, EOD (every assistant turn of a conversation preceded by
its own annotation) with roles PROMPT, ANNOTATION_KEY/VALUE, RESPONSE, EOD, into
``PREFIX_text_document.{bin,idx}`` and ``PREFIX_text_document_roles.{bin,idx}``. Train on it with
``pretrain_anchor.py --finetune --load PRETRAINED --loss-mask-policy sft-anchored`` (or ``sft-standard`` for
data written with ``--no-annotations``). Examples::

    # responses annotated by the embedded annotator, ChatML template, samples over 1024 tokens dropped
    python tools/preprocess_sft.py --input sft.jsonl --output-prefix data/sft \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --chat-template chatml \\
        --seq-length 1024

    # responses annotated by the LLM annotator (cached, resumable), then tokenized
    python tools/preprocess_sft.py --input sft.jsonl --output-prefix data/sft --annotator vllm \\
        --url http://node1:8000 ... --tokenizer-type ... --tokenizer-model ...

    # the standard-SFT baseline from the same input
    python tools/preprocess_sft.py --input sft.jsonl --output-prefix data/sft_std --no-annotations ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_anchor.annotation.annotate_config import AnnotateError
from megatron_anchor.annotation.schema import DocumentError
from megatron_anchor.bounds import ranged
from megatron_anchor.outputs import require_input, write_json
from megatron_anchor.data.cli import add_output_arguments, add_runtime_arguments, add_tokenizer_arguments
from megatron_anchor.data.preprocess import PreprocessConfig, run
from megatron_anchor.data.sft import (
    DEFAULT_FORMAT_STABILITY_FRACTION,
    OVERLONG_MODES,
    TEMPLATE_PRESETS,
    SFTConverter,
    load_template,
)
from megatron_anchor.tokenizer import TokenizerError, build_tokenizer
from megatron_anchor.tokenizer.fast import FastBackendError

logger = logging.getLogger("preprocess_sft")


def get_parser() -> argparse.ArgumentParser:
    """The command-line interface (every flag documented in --help)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True,
                   help="SFT JSONL: {'prompt', 'response'[, 'system'][, 'annotation']} or {'messages': [{'role': "
                        "system|user|assistant, 'content', ['annotation']}, ...]} per line; see docs/sft.md")
    g.add_argument("--chat-template", default="plain",
                   help=f"preset ({', '.join(TEMPLATE_PRESETS)}) or a JSON/YAML file of template fields "
                        "(system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix, "
                        "assistant_suffix; 'base: PRESET' to extend a preset). Default: plain")
    g.add_argument("--no-annotations", action="store_true",
                   help="write standard-SFT data (no annotation before the responses) from the same input: the "
                        "baseline for --loss-mask-policy sft-standard")
    g.add_argument("--skip-bad-samples", "--skip-bad-documents", dest="skip_bad_samples", action="store_true",
                   help="skip bad samples (malformed JSON, missing response, empty turns, unknown roles, bad "
                        "annotations) and count them, instead of stopping at the first with its file:line")

    g = p.add_argument_group("annotation")
    g.add_argument("--annotator", choices=["default", "vllm", "none"], default="default",
                   help="how responses without an 'annotation' are annotated: 'default' the embedded annotator "
                        "(in the tokenizing workers); 'vllm' the LLM annotator at --url, as a first stage that "
                        "writes PREFIX.sft_annotated.jsonl (cached and resumable, the same client and cache as "
                        "pretraining annotation); 'none' makes unannotated responses an error")
    g.add_argument("--format-stability-fraction", default=DEFAULT_FORMAT_STABILITY_FRACTION, **ranged(
        float, "share of samples, chosen by a stable hash of the sample's content and the seed (identical between "
               "runs), whose annotation delimiters, keys and separators are written with role RESPONSE and so keep "
               "their loss; values stay masked (default: %(default)s)", ge=0, le=1))
    g.add_argument("--format-stability-seed", type=int, default=0,
                   help="seed of the format-stability choice (default: 0)")
    g.add_argument("--url", action="append", default=[], metavar="URL",
                   help="--annotator vllm: a replica's base URL (repeat or comma-separate for several)")
    g.add_argument("--model", default=None, help="--annotator vllm: served model name (default: the first listed)")
    g.add_argument("--api-key-file", default=None,
                   help="--annotator vllm: file whose first line is the API key (else $ANNOTATOR_API_KEY)")
    g.add_argument("--concurrency", default=32, **ranged(int, "--annotator vllm: requests in flight (default: 32)",
                                                          ge=1))
    g.add_argument("--schema", default=None, help="--annotator vllm: tag schema YAML (default: the packaged one)")
    g.add_argument("--annotation-cache", default=None,
                   help="--annotator vllm: SQLite annotation cache; point it at the pretraining run's cache to "
                        "share it (default: PREFIX.sft_annotated.jsonl.cache.sqlite)")

    g = p.add_argument_group("sequences")
    g.add_argument("--seq-length", default=0, **ranged(
        int, "the training --seq-length; samples with more tokens are handled by --overlong (0: no limit)", ge=0))
    g.add_argument("--pack", action="store_true",
                   help="pack whole samples (first fit, in order) into sequences of exactly --seq-length tokens, "
                        "padded with role PAD, so that no training sample is split across two sequences; train "
                        "with the same --seq-length and --reset-attention-mask --reset-position-ids")
    g.add_argument("--overlong", choices=OVERLONG_MODES, default="drop",
                   help="samples over --seq-length: 'drop' them, or 'truncate' them to --seq-length tokens "
                        "(the cut sample ends in an EOD id with role PAD, so it carries no loss; samples with no "
                        "response token left are dropped). Both are counted (default: drop)")

    add_tokenizer_arguments(p)

    add_output_arguments(p, ". Not with --annotator vllm: annotate the responses first")

    add_runtime_arguments(p)
    return p


def annotate_with_llm(args, annotated_path: str) -> str:
    """First stage for ``--annotator vllm``: annotate every response through the annotate job
    (:mod:`megatron_anchor.data.sft_annotate` writes its input and reads its output back) into annotated SFT JSONL
    at ``annotated_path``. Rerunning resumes the job; its cache makes repeated responses free. Returns the path the
    second stage reads.
    """
    from pathlib import Path

    from megatron_anchor.annotation.annotate import annotate_file
    from megatron_anchor.annotation.annotate_config import AnnotateConfig, format_summary
    from megatron_anchor.annotation.llm.client import ClientConfig, load_api_key
    from megatron_anchor.data.sft_annotate import write_annotated_sft, write_job_input

    urls = [u.strip() for item in args.url for u in item.split(",") if u.strip()]
    if not urls:
        raise SystemExit("--annotator vllm needs at least one --url")
    job_in, job_out = annotated_path + ".job-input.jsonl", annotated_path + ".job-output.jsonl"
    bad = write_job_input(args.input, job_in, args.skip_bad_samples)
    client = ClientConfig(urls=urls, model=args.model, concurrency=args.concurrency,
                          api_key=load_api_key(args.api_key_file))
    cfg = AnnotateConfig(input=Path(job_in), output=Path(job_out), annotator="vllm", client=client,
                         schema_path=Path(args.schema) if args.schema else None,
                         cache_path=Path(args.annotation_cache or annotated_path + ".cache.sqlite"),
                         overwrite=args.overwrite, progress=not args.no_progress)
    stats = annotate_file(cfg)
    logger.info(format_summary(stats, cfg))
    write_annotated_sft(job_out, args.input, annotated_path)
    logger.info(f"annotated SFT JSONL: {annotated_path} (bad input lines skipped: {bad}; samples whose "
                f"responses could not be annotated: {stats.documents_failed}, see {cfg.failed_path})")
    return annotated_path


def main(argv=None) -> int:
    """Run SFT preprocessing; returns the exit status (0 ok, 1 bad input, 2 usage error)."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        require_input(args.input, "--input")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        template = load_template(args.chat_template)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data_input = args.input
    if args.num_shards > 1 and args.annotator == "vllm" and not args.no_annotations:
        print("error: --num-shards with --annotator vllm: annotate the responses first (this tool without "
              "--num-shards, or tools/annotate.py sharded) and shard the annotated file", file=sys.stderr)
        return 2
    try:
        if args.annotator == "vllm" and not args.no_annotations:
            data_input = annotate_with_llm(args, args.output_prefix + ".sft_annotated.jsonl")
        pad_id = None
        if args.pack:
            if not args.seq_length:
                print("error: --pack needs --seq-length (the training sequence length)", file=sys.stderr)
                return 2
            pad_id = build_tokenizer(args.tokenizer_type, args.tokenizer_model, eod_token=args.eod_token).eod
        converter = SFTConverter(
            template, annotations=not args.no_annotations,
            annotator="none" if args.annotator == "vllm" else args.annotator,
            format_stability_fraction=args.format_stability_fraction,
            format_stability_seed=args.format_stability_seed, seq_length=args.seq_length,
            overlong=args.overlong, pack=args.pack, pad_id=pad_id,
        )
        cfg = PreprocessConfig(
            input=data_input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
            tokenizer_model=args.tokenizer_model, workers=args.workers, append_eod=True,
            annotations=not args.no_annotations, skip_bad_documents=args.skip_bad_samples,
            docs_per_part=args.docs_per_part, eod_token=args.eod_token,
            overwrite=args.overwrite, show_progress=not args.no_progress, converter=converter,
            num_shards=args.num_shards, shard_index=args.shard_index, tokenizer_backend=args.tokenizer_backend,
        )
        total = run(cfg)
    except (DocumentError, TokenizerError, FastBackendError, AnnotateError) as e:
        print(f"error: {e}\n(finished parts are kept: fix the input, or pass --skip-bad-samples, and rerun the "
              "same command to resume)", file=sys.stderr)
        return 1
    counts = total.extra
    samples = counts.get("samples", 0)
    share = counts.get("format_stable", 0) / samples if samples else 0.0
    summary = {
        "samples": samples, "sequences": total.documents, "assistant_turns": total.chunks, "tokens": total.tokens,
        "pack_padding_tokens": counts.get("pack_padding_tokens", 0),
        "annotation_tokens": total.annotation_tokens, "annotated_here": total.annotated_here,
        "format_stable": counts.get("format_stable", 0), "format_stable_share": round(share, 6),
        "truncated": counts.get("truncated", 0), "dropped_overlong": total.dropped, "skipped_bad": total.skipped,
        "template": template.name, "annotations": not args.no_annotations,
    }
    write_json(cfg.output_path_prefix + ".sft_stats.json", summary, indent=1)
    logger.info("SFT: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
