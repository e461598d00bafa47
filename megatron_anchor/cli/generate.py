"""Sample from a megatron-anchor checkpoint (any TP/PP layout) or an exported folder: JSONL in, JSONL out.

    python tools/generate.py --prompts prompts.jsonl --output samples.jsonl --load CKPT --config run.yaml \\
        --mode anchored --n 8 --temperature 1.0 --top-p 0.95 --max-new-tokens 256 --seed 0
    python tools/generate.py --prompts prompts.jsonl --output samples.jsonl --model-dir exported/ --mode plain
    python tools/generate.py --prompts prompts.jsonl --output samples.jsonl --model-dir exported/ \\
        --engine vllm --vllm-url http://127.0.0.1:8000 --n 32

Prompts file: one JSON object per line with "prompt" (and optional "system") or "messages" ending with a user
turn; optional "id", "n" (samples for this prompt) and "annotation" ([[key, value], ...], for --mode conditioned).
Prompts are formatted with --chat-template exactly as SFT formats them.

Modes: anchored (the model writes an annotation, then the response; the response and the sampled annotation are
reported separately), conditioned (the prompt's given annotation is used), plain (no annotation).
Output: one line per sample: id, sample index, mode, response, annotation (tags, raw text, whether it closed by
itself), token counts. Model flags other than these are the trainer's (see pretrain_anchor.py --help).

Engines: the in-house KV-cached decoder (default; checkpoints or exported folders), or vLLM on an exported folder
(--engine vllm): a running server (--vllm-url; tools/annotator_server.py --model FOLDER starts one) or, without
a URL, vllm.LLM in this process (vllm importable here; --vllm-arg passes engine arguments). Both sample the same
distribution: annotation up to its closing delimiter, then the response (docs/generation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from megatron_anchor.bounds import argument, ranged
from megatron_anchor.inference.sampler import SamplingParams


def build_parser() -> argparse.ArgumentParser:
    """This tool's flags; any other flag describes the model for the trainer's parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="prompts JSONL file")
    p.add_argument("--output", required=True, help="where to write the samples (JSONL)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="megatron-anchor checkpoint directory; its run_config.yaml supplies the model "
                                    "(training flags given here, or --config, override it)")
    src.add_argument("--model-dir", help="a folder written by tools/export_hf.py")
    p.add_argument("--iteration", default=None, **ranged(int, "checkpoint iteration (default: the latest)", ge=0))
    p.add_argument("--allow-missing-tokenizer-record", action="store_true",
                   help="sample from a checkpoint without tokenizer_record.json (written before records existed) "
                        "with the tokenizer flags given; without this such a checkpoint is refused")
    p.add_argument("--mode", choices=("anchored", "conditioned", "plain"), default="anchored",
                   help="anchored: annotation then response; conditioned: the prompt's annotation; plain: none")
    p.add_argument("--n", default=1, **ranged(int, "samples per prompt (a prompt's own 'n' wins; default 1)", ge=1))
    sp = SamplingParams
    p.add_argument("--temperature", **argument(sp, "temperature", "sampling temperature, 0 = greedy (default 1.0)"))
    p.add_argument("--top-p", **argument(sp, "top_p", "nucleus sampling mass (default 1.0: off)"))
    p.add_argument("--top-k", **argument(sp, "top_k", "sample among the k most likely tokens (default 0: off)"))
    p.add_argument("--max-new-tokens", **argument(sp, "max_new_tokens", "cap on response tokens (default 128)"))
    p.add_argument("--max-annotation-tokens", **argument(
        sp, "max_annotation_tokens", "cap on annotation tokens; the closing delimiter is forced at the cap "
                                     "(default 64)"))
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; prompt i uses seed + i, so results do not depend on batching (default 0)")
    p.add_argument("--chat-template", default="plain",
                   help="chat template preset (plain, simple, chatml) or a JSON/YAML file, as in SFT preprocessing")
    p.add_argument("--no-cache", action="store_true", help="recompute the full prefix each token (for checks)")
    p.add_argument("--engine", choices=("decoder", "vllm"), default="decoder",
                   help="decoder: the in-house KV-cached decoder (default); vllm: vLLM on --model-dir")
    p.add_argument("--vllm-url", default=None,
                   help="--engine vllm: base URL of a vLLM server serving --model-dir (default: vllm.LLM in this "
                        "process)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="--engine vllm without --vllm-url: an argument of vllm.LLM, value parsed as JSON when it "
                        "parses (e.g. enforce_eager=true, tensor_parallel_size=2); repeatable")
    return p


def vllm_engine_args(pairs: List[str]) -> dict:
    """``KEY=VALUE`` strings -> keyword arguments (JSON values where they parse, else strings)."""
    out = {}
    for item in pairs:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--vllm-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Generate; returns 0, or 2 on bad input (prompts file, checkpoint, flags)."""
    from megatron_anchor.data.sft import load_template
    from megatron_anchor.inference import CheckpointError, PromptFileError, read_prompts
    from megatron_anchor.inference.generator import load_from_checkpoint, load_from_hf_folder
    from megatron_anchor.inference.sampler import GenerationStats
    from megatron_anchor.inference.vllm_engine import VllmError, load_vllm_generator
    from megatron_anchor.outputs import OutputError, atomic_write, check_outputs

    args, model_args = build_parser().parse_known_args(argv)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, max_annotation_tokens=args.max_annotation_tokens,
                            use_cache=not args.no_cache)
    try:
        params.check()
        template_file = args.chat_template if os.path.isfile(args.chat_template) else None
        check_outputs([("--output", args.output)], [("--prompts", args.prompts), ("--chat-template", template_file)])
        template = load_template(args.chat_template)
        prompts = read_prompts(args.prompts)
        if args.mode == "conditioned":
            missing = [p.id for p in prompts if not p.annotation]
            if missing:
                raise PromptFileError(f"{args.prompts}: --mode conditioned needs an 'annotation' on every prompt; "
                                      f"missing on ids {missing[:5]}")
        if args.engine == "vllm":
            if not args.model_dir:
                raise ValueError("--engine vllm samples from an exported folder: pass --model-dir "
                                 "(tools/export_hf.py writes one)")
            gen = load_vllm_generator(args.model_dir, template, url=args.vllm_url,
                                      engine_args=vllm_engine_args(args.vllm_arg))
        elif args.vllm_url or args.vllm_arg:
            raise ValueError("--vllm-url and --vllm-arg need --engine vllm")
        elif args.model_dir:
            gen = load_from_hf_folder(args.model_dir, template)
        else:
            gen = load_from_checkpoint(model_args, args.load, args.iteration, template,
                                       allow_missing_record=args.allow_missing_tokenizer_record)
    except (CheckpointError, PromptFileError, ValueError, FileNotFoundError, VllmError, OutputError) as exc:
        print(f"generate.py: error: {exc}", file=sys.stderr)
        return 2
    stats = GenerationStats()
    # vLLM batches every prompt's requests together; the in-house decoder batches prompts up to its batch_rows
    # rows (every prompt has at least one), and a call's rows are written as it returns.
    per_call = len(prompts) if args.engine == "vllm" else gen.batch_rows
    try:
        with atomic_write(args.output) as out:  # never a half-written output file
            for start in range(0, len(prompts), per_call):
                part = prompts[start:start + per_call]
                batches = gen.generate_many(part, [p.n or args.n for p in part], args.mode, params,
                                            [args.seed + start + k for k in range(len(part))], stats)
                for prompt, rows in zip(part, batches):
                    for j, row in enumerate(rows):
                        out.write(json.dumps({"id": prompt.id, "sample": j, "mode": args.mode,
                                              "prompt": prompt.text, **row}, ensure_ascii=False) + "\n")
    except (ValueError, VllmError) as exc:
        print(f"generate.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"generate.py: interrupted; {args.output} was not written", file=sys.stderr)
        return 130
    tokens = stats.annotation_tokens + stats.response_tokens
    print(json.dumps({"prompts": len(prompts), "output": args.output, "engine": args.engine,
                      "annotation_tokens": stats.annotation_tokens,
                      "response_tokens": stats.response_tokens, "seconds": round(stats.seconds, 3),
                      "tokens_per_s": round(tokens / max(stats.seconds, 1e-9), 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
