"""Step time of the trainer with the role channel + loss-mask policy vs the same loop on a stock GPTDataset.

One process, one model and optimizer: steps alternate in blocks between (a) ``AnchorGPTDataset`` samples with
the ``--loss-mask-policy`` mask and per-role loss reporting and (b) megatron-core's stock ``GPTDataset`` with
megatron's own mask, so both see the same machine state. Prints median step times and their ratio (target
<= 1.03). Builds a small synthetic dataset with the project's tools unless ``--data-path`` is given.

    python benchmarks/bench_trainer.py [--steps 40] [--block 5] [--hidden-size 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")


def build_dataset(work: str) -> tuple:
    """Synthetic annotated corpus -> tokenizer -> token + role dataset (the project's own tools)."""
    from megatron_anchor.data.synthetic import write_raw_jsonl
    from tools import preprocess_data, train_tokenizer

    write_raw_jsonl(os.path.join(work, "corpus.jsonl"), 600, seed=3)
    train_tokenizer.main(["--input", os.path.join(work, "corpus.jsonl"), "--output-prefix",
                          os.path.join(work, "tok"), "--vocab-size", "512"])
    preprocess_data.main(["--input", os.path.join(work, "corpus.jsonl"), "--output-prefix",
                          os.path.join(work, "data"), "--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", os.path.join(work, "tok.model"), "--append-eod", "--workers", "1",
                          "--no-progress"])
    return os.path.join(work, "data_text_document"), os.path.join(work, "tok.model")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    ap.add_argument("--block", type=int, default=5, help="consecutive steps per variant before switching")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--policy", default="pretrain", help="loss-mask policy of the anchored variant")
    ap.add_argument("--data-path", help="existing token dataset prefix (with its _roles channel)")
    ap.add_argument("--tokenizer-model", help="its SentencePiece model")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.data import build_data
    from megatron_anchor.training.loop import setup, train_step
    from megatron_anchor.training.loss import make_forward_step

    import pretrain_anchor as pa

    work = tempfile.mkdtemp(prefix="bench_trainer_")
    prefix, tok = (args.data_path, args.tokenizer_model) if args.data_path else build_dataset(work)
    total = args.warmup + args.steps
    argv = ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
            "--split", "100,0,0", "--eval-iters", "0", "--data-cache-path", os.path.join(work, "cache"),
            "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", "4", "--swiglu", "--normalization", "RMSNorm",
            "--position-embedding-type", "rope", "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--train-iters", str(2 * total + DATA_REPEATS), "--lr", "1e-3", "--hidden-dropout", "0", "--attention-dropout", "0"]
    anchored_cfg = parse_args(argv + ["--loss-mask-policy", args.policy])
    tr = setup(anchored_cfg, pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)
    anchored = (tr.train_iter, tr.forward_step)

    stock_cfg = parse_args(argv + ["--no-role-channel"])
    from megatron_anchor.training.arguments import validate

    validate(stock_cfg, 1, torch.cuda.is_available(), False)
    stock_iter, _ = build_data(stock_cfg, _tokenizer(stock_cfg), 0, 0, 1)
    stock = (stock_iter, make_forward_step("pretrain", tr.device, use_roles=False))

    times = {"anchored": [], "stock": []}
    variants = {"anchored": anchored, "stock": stock}
    for name, (it, fs) in variants.items():  # warm-up both paths
        tr.train_iter, tr.forward_step = it, fs
        for _ in range(args.warmup):
            train_step(tr)
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        for name, (it, fs) in variants.items():
            tr.train_iter, tr.forward_step = it, fs
            for _ in range(n):
                start = time.perf_counter()
                train_step(tr)
                times[name].append(time.perf_counter() - start)
        done += n

    data_ms = _data_path_cost(anchored_cfg, stock_cfg, tr.device, args)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    mean = {k: statistics.fmean(v) * 1000 for k, v in times.items()}
    ratio = med["anchored"] / med["stock"]
    tokens = args.global_batch_size * args.seq_length
    print(f"model: {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, "
          f"global batch {args.global_batch_size}, torch threads {torch.get_num_threads()}")
    for k in ("stock", "anchored"):
        print(f"{k:>9}: median {med[k]:8.2f} ms/step  mean {mean[k]:8.2f} ms/step  "
              f"{tokens / med[k] * 1000:9.1f} tokens/s  ({len(times[k])} steps)")
    print(f"ratio anchored/stock (median step time): {ratio:.4f}  (target <= 1.03)")
    extra = data_ms["anchored"] - data_ms["stock"]
    bound = 1.0 + extra / med["stock"]
    print(f"data + mask path per step (isolated, median of {DATA_REPEATS}): stock {data_ms['stock']:.3f} ms, "
          f"anchored {data_ms['anchored']:.3f} ms -> +{extra:.3f} ms = ratio {bound:.4f} of the stock step")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"median_ms": med, "mean_ms": mean, "ratio": ratio, "data_path_ms": data_ms,
                       "data_path_ratio": bound, "args": vars(args)}, fh, indent=2)
    from megatron_anchor.training.initialize import shutdown

    shutdown()
    return 0


DATA_REPEATS = 30


def _data_path_cost(anchored_cfg, stock_cfg, device, args):
    """Median ms to fetch one step's micro-batches and build its loss mask, per variant (no model).

    The model's compute is identical in both variants, so this isolates what the role channel adds; it is far
    less sensitive to other load on the machine than whole step times.
    """
    import torch

    from megatron_anchor.training.data import build_datasets, build_iterator
    from megatron_anchor.training.loss import apply_policy, loss_func, policy_table

    n_micro = args.global_batch_size // args.micro_batch_size
    out = {}
    for name, cfg in (("stock", stock_cfg), ("anchored", anchored_cfg)):
        train_ds = build_datasets(cfg, _tokenizer(cfg))[0]
        it = build_iterator(train_ds, 0, cfg, 0, 1)
        table = policy_table(args.policy) if name == "anchored" else None
        samples = []
        for _ in range(DATA_REPEATS):
            start = time.perf_counter()
            for _ in range(n_micro):
                batch = next(it)
                roles = batch.get("roles") if table is not None else None
                mask = apply_policy(batch["loss_mask"].to(device), roles, table)
                fake = torch.zeros(batch["labels"].shape, device=device)
                loss_func(mask, roles, fake, report_role_losses=table is not None and args.policy == "pretrain")
            samples.append((time.perf_counter() - start) * 1000)
        out[name] = statistics.median(samples)
    return out


def _tokenizer(cfg):
    from megatron_anchor.training.data import build_tokenizer

    return build_tokenizer(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
