"""Generation benchmarks on CPU: KV cache against full-prefix recomputation, and anchored against plain latency.

    python benchmarks/bench_generate.py                      # random weights, default size
    python benchmarks/bench_generate.py --model-dir exported/  # an exported folder

1. Throughput (new tokens/s) of the same sampler with the KV cache and with the whole prefix recomputed at every
   step, in one run, same prompt, same number of new tokens (default 256, end-of-document banned so every row
   generates them all). Target: >= 5x.
2. Latency of anchored generation against plain generation at the same response length. The annotation adds its
   tokens, so the bound is 1 + annotation_tokens / response_tokens + 0.1.
3. Annotations at many prompts (what tools/evaluate_midtraining.py samples): ``--prompts`` prompts of different
   lengths, ``--batch`` anchored samples each, annotation to its cap and one response token, all prompts in one
   left-padded batch (``generate_batch``) against prompt by prompt (``generate_ids``). Target: >= 2x for a model
   whose weights outgrow the CPU caches (``--hidden 768 --layers 6 --vocab 8192``); see benchmarks/README.md.
Prints one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import List, Optional

import torch

from megatron_anchor.inference.model import DecoderLM, ModelSpec, num_parameters
from megatron_anchor.inference.sampler import (
    GenerationStats,
    SamplingParams,
    generate_batch,
    generate_ids,
)


def build_parser() -> argparse.ArgumentParser:
    """Benchmark flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="exported folder (default: a random model of the size below)")
    p.add_argument("--layers", type=int, default=4, help="random model: layers (default 4)")
    p.add_argument("--hidden", type=int, default=256, help="random model: hidden size (default 256)")
    p.add_argument("--heads", type=int, default=8, help="random model: attention heads (default 8)")
    p.add_argument("--vocab", type=int, default=1024, help="random model: vocabulary (default 1024)")
    p.add_argument("--batch", type=int, default=8, help="samples per prompt (rows per batch, default 8)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens per sample (default 256)")
    p.add_argument("--annotation-tokens", type=int, default=24,
                   help="annotation length in the anchored run (its cap; default 24)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, best taken (default 3)")
    p.add_argument("--prompts", type=int, default=16,
                   help="prompts of the batched-prompts measure (default 16; 0 skips it)")
    p.add_argument("--skip-recompute", action="store_true", help="only the anchored-against-plain latency")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two OpenMP threads contending with "
                        "other processes made a decode step 10x slower; 0 keeps torch's choice)")
    return p


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmarks; prints and returns the figures."""
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.model_dir:
        model = DecoderLM.from_hf_folder(a.model_dir)
    else:
        spec = ModelSpec(vocab_size=a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                         num_kv_heads=a.heads, head_dim=a.hidden // a.heads, ffn_hidden_size=4 * a.hidden,
                         max_positions=2 * a.prompt_tokens + a.annotation_tokens + a.new_tokens + 8)
        model = DecoderLM(spec).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    v = model.spec.vocab_size
    eod, ann_open, ann_close = v - 1, v - 2, v - 3
    prompt = torch.randint(0, v - 3, (a.prompt_tokens,)).tolist()
    # Special ids get no probability through a vocab cap except when forced, so lengths are exact: the response
    # never ends early (eod is out of reach) and the annotation always runs to its cap.
    cap = v - 3

    def run(mode: str, use_cache: bool, new_tokens: int, stats: Optional[GenerationStats] = None):
        params = SamplingParams(max_new_tokens=new_tokens, max_annotation_tokens=a.annotation_tokens,
                                use_cache=use_cache)
        return generate_ids(model, prompt, a.batch, mode, params, eod, ann_open, ann_close, vocab_size=cap,
                            seed=0, stats=stats)

    run("plain", True, 4)  # warm-up
    total = a.batch * a.new_tokens
    t_cache = _time(lambda: run("plain", True, a.new_tokens), a.repeats)
    # The slow path once is enough.
    t_full = float("nan") if a.skip_recompute else _time(lambda: run("plain", False, a.new_tokens), 1)
    # Plain and anchored runs alternate, best of each, so load drifting on a shared machine hits both alike.
    t_plain = t_anch = float("inf")
    stats = GenerationStats()
    for _ in range(a.repeats):
        t_plain = min(t_plain, _time(lambda: run("plain", True, a.new_tokens), 1))
        t_anch = min(t_anch, _time(lambda: run("anchored", True, a.new_tokens, stats), 1))
    ann_tokens = stats.annotation_tokens / max(1, a.repeats * a.batch)
    bound = 1 + ann_tokens / a.new_tokens + 0.1
    result = {
        "model": a.model_dir or "random", "parameters": num_parameters(model), "batch": a.batch,
        "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "threads": torch.get_num_threads(),
        "kv_cache_tokens_per_s": round(total / t_cache, 1), "recompute_tokens_per_s": round(total / t_full, 1),
        "kv_cache_speedup": round(t_full / t_cache, 2),
        "plain_seconds": round(t_plain, 3), "anchored_seconds": round(t_anch, 3),
        "annotation_tokens": ann_tokens, "anchored_over_plain": round(t_anch / t_plain, 3),
        "anchored_bound": round(bound, 3),
    }
    if a.prompts:
        # Prompt lengths spread over [prompt_tokens / 2, 3 * prompt_tokens / 2): the batch is left-padded.
        g = torch.Generator().manual_seed(1)
        many = [torch.randint(0, v - 3, (a.prompt_tokens // 2 + (k * a.prompt_tokens) // a.prompts,),
                              generator=g).tolist() for k in range(a.prompts)]
        params = SamplingParams(max_new_tokens=1, max_annotation_tokens=a.annotation_tokens)
        seeds = list(range(a.prompts))

        def together():
            generate_batch(model, many, [a.batch] * a.prompts, "anchored", params, eod, ann_open, ann_close,
                           vocab_size=cap, seeds=seeds)

        def one_by_one():
            for ids, seed in zip(many, seeds):
                generate_ids(model, ids, a.batch, "anchored", params, eod, ann_open, ann_close, vocab_size=cap,
                             seed=seed)

        t_one = t_together = float("inf")
        for _ in range(a.repeats):  # alternating, best of each
            t_one = min(t_one, _time(one_by_one, 1))
            t_together = min(t_together, _time(together, 1))
        result.update({"prompts": a.prompts, "prompts_one_by_one_seconds": round(t_one, 3),
                       "prompts_batched_seconds": round(t_together, 3),
                       "prompts_batched_speedup": round(t_one / t_together, 2)})
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
