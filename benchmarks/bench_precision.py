"""bf16 against fp32 training steps on this machine, at several model widths, same run.

For each width one process builds two trainers with megatron-core's own stack (``megatron_anchor.training.loop``:
``Float16Module`` + fp32 main weights for bf16, the FP32 optimizer for fp32) on megatron-core's mock data, and
alternates blocks of steps between them so both arms see the same machine state. Prints the median step time of
each arm and the speedup (fp32 ms / bf16 ms); on CPUs with AMX / AVX512-BF16 the bf16 matrix products are the
faster path, which grows with the width (the GEMMs dominate). Memory: two models of the given width; time: linear in
steps.

    python benchmarks/bench_precision.py [--widths 256 1024] [--steps 12] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

warnings.filterwarnings("ignore")


def _trainer(width: int, layers: int, seq: int, mbs: int, bf16: bool):
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.data import build_data
    from megatron_anchor.training.loop import setup
    from megatron_anchor.training.loss import make_forward_step
    from megatron_anchor.training.model import model_provider

    argv = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
            "--num-layers", str(layers), "--hidden-size", str(width), "--num-attention-heads", str(max(width // 64, 1)),
            "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
            "--seq-length", str(seq), "--micro-batch-size", str(mbs), "--train-iters", "100000", "--lr", "1e-4",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0", "--log-interval", "100000",
            "--no-exit-signal-handler", *(["--bf16"] if bf16 else [])]
    # pretrain_anchor.py's seams, for megatron-core's mock data (no role channel): the plain pretraining loss.
    return setup(parse_args(argv), model_provider, build_data,
                 lambda cfg, device: make_forward_step("pretrain", device, use_roles=False))


def _block(tr, steps: int) -> list:
    from megatron_anchor.training.loop import run

    marks = [time.perf_counter()]
    run(tr, on_step=lambda it, metrics: marks.append(time.perf_counter()), steps=steps)
    return [b - a for a, b in zip(marks, marks[1:])]


def measure(width: int, args) -> dict:
    """Median ms/step of fp32 and bf16 at ``width``, alternating blocks of ``args.block`` steps."""
    arms = {"fp32": _trainer(width, args.layers, args.seq_length, args.micro_batch_size, False),
            "bf16": _trainer(width, args.layers, args.seq_length, args.micro_batch_size, True)}
    times = {name: [] for name in arms}
    for tr in arms.values():
        _block(tr, args.warmup)
    while len(times["fp32"]) < args.steps:
        for name, tr in arms.items():
            times[name].extend(_block(tr, min(args.block, args.steps - len(times[name]))))
    med = {name: statistics.median(v) * 1000 for name, v in times.items()}
    tokens = args.micro_batch_size * args.seq_length
    return {"width": width, "median_ms": med, "tokens_per_s": {k: tokens / v * 1000 for k, v in med.items()},
            "speedup_bf16": med["fp32"] / med["bf16"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024], help="hidden sizes to compare at")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per arm and width")
    ap.add_argument("--block", type=int, default=3, help="consecutive steps per arm before switching")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per arm")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    rows = [measure(w, args) for w in args.widths]
    print(f"{args.layers} layers, seq {args.seq_length}, micro-batch {args.micro_batch_size}, torch threads "
          f"{torch.get_num_threads()}, {args.steps} timed steps per arm")
    for r in rows:
        print(f"hidden {r['width']:5d}: fp32 {r['median_ms']['fp32']:9.1f} ms/step  bf16 {r['median_ms']['bf16']:9.1f} "
              f"ms/step  bf16 speedup {r['speedup_bf16']:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"rows": rows, "args": vars(args)}, fh, indent=2)
    from megatron_anchor.training.initialize import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
