"""Step time of the trainer's whole loop against the stock megatron-core loop, same model, same run.

One model and optimizer; blocks of steps alternate between two arms so both see the same machine state:

- **ours**: ``megatron_anchor.training.loop.run`` for a block of steps, everything in: ``AnchorGPTDataset``
  samples (role channel) read through the tensor-parallel reader and its single-buffer hand-over, the
  ``--loss-mask-policy`` mask with per-role loss reporting, the one all-reduce per step (losses, FLOPs work, exit
  and NaN flags), the NaN/Inf check, the exit-signal and time-budget guards, the profiler hook, throughput/MFU and
  peak-memory logging every ``--log-interval`` steps;
- **stock**: the loop of megatron-core's own example (``run_simple_mcore_train_loop.py``): megatron-core's
  ``GPTDataset`` through a plain DataLoader, a forward step with megatron's loss mask, ``get_forward_backward_func``,
  ``optimizer.step()``, the LR schedule; nothing else.

Prints the median step time of each arm and their ratio (target <= 1.03). Also isolates the data + mask path
(sample fetch, collation, hand-over, policy mask, per-role sums) of the two arms without the model, which is far
less sensitive to other load on the machine. Builds a small synthetic dataset with the project's tools unless
``--data-path`` is given. Runs under ``torchrun`` too, on a dataset given with ``--data-path`` (e.g. ``--tensor-model-parallel-size 2``).

    python benchmarks/bench_trainer.py [--steps 40] [--block 5] [--hidden-size 256] [--json out.json]
    torchrun --nproc-per-node 2 benchmarks/bench_trainer.py --tensor-model-parallel-size 2 --data-path P \
        --tokenizer-model M
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from functools import partial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

DATA_REPEATS = 30


def build_dataset(work: str) -> tuple:
    """Synthetic annotated corpus -> tokenizer -> token + role dataset (the project's own tools)."""
    from megatron_anchor.data.synthetic import write_raw_jsonl
    from megatron_anchor.cli import preprocess_data, train_tokenizer

    write_raw_jsonl(os.path.join(work, "corpus.jsonl"), 600, seed=3)
    train_tokenizer.main(["--input", os.path.join(work, "corpus.jsonl"), "--output-prefix",
                          os.path.join(work, "tok"), "--vocab-size", "512"])
    preprocess_data.main(["--input", os.path.join(work, "corpus.jsonl"), "--output-prefix",
                          os.path.join(work, "data"), "--tokenizer-type", "SentencePieceTokenizer",
                          "--tokenizer-model", os.path.join(work, "tok.model"), "--append-eod", "--workers", "1",
                          "--no-progress"])
    return os.path.join(work, "data_text_document"), os.path.join(work, "tok.model")


def stock_forward_step(device, data_iterator, model):
    """megatron-core's example forward step: the batch to the device, the model, a masked token-sum loss."""
    import torch

    batch = next(data_iterator)
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    position_ids, loss_mask = batch["position_ids"].to(device), batch["loss_mask"].to(device)
    output = model(tokens, position_ids, None, labels=labels)

    def loss_func(output_tensor):
        losses = output_tensor.float().view(-1)
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        num_tokens = mask.sum().to(torch.int)
        return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), mask.sum().detach()])}

    return output, loss_func


def stock_step(tr, data_iterator, device) -> None:
    """One optimizer step of megatron-core's example loop on the trainer's model and optimizer."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t, seq = tr.cfg.training, tr.cfg.model.seq_length
    for chunk in tr.model:
        chunk.zero_grad_buffer()
    tr.optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=partial(stock_forward_step, device), data_iterator=data_iterator, model=tr.model[0],
        num_microbatches=t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size()),
        seq_length=seq, micro_batch_size=t.micro_batch_size, decoder_seq_length=seq, forward_only=False)
    tr.optimizer.step()
    tr.scheduler.step(increment=1)


def ours_block(tr, steps: int) -> list:
    """``steps`` iterations of the trainer's own loop; the wall time of each (from one step's end to the next)."""
    from megatron_anchor.training.loop import run

    marks = [time.perf_counter()]
    run(tr, on_step=lambda it, metrics: marks.append(time.perf_counter()), steps=steps)
    return [b - a for a, b in zip(marks, marks[1:])]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per arm")
    ap.add_argument("--block", type=int, default=5, help="consecutive steps per arm before switching")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per arm")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--log-interval", type=int, default=10, help="the trainer's --log-interval in the ours arm")
    ap.add_argument("--policy", default="pretrain", help="loss-mask policy of the ours arm")
    ap.add_argument("--data-path", help="existing token dataset prefix (with its _roles channel)")
    ap.add_argument("--tokenizer-model", help="its SentencePiece model")
    ap.add_argument("--extra", default="", help="more trainer flags for both arms (e.g. '--bf16' on a GPU)")
    ap.add_argument("--json", help="also write the figures here")
    return ap


def common_flags(args, prefix: str, tok: str) -> list:
    """Trainer flags both arms share (the model, the data, the schedule, ``--extra`` last so it overrides)."""
    total = args.warmup + args.steps
    return ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tok,
            "--split", "100,0,0", "--eval-iters", "0", "--data-cache-path", os.path.join(os.path.dirname(prefix),
                                                                                         "cache"),
            "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", "4", "--swiglu", "--normalization", "RMSNorm",
            "--position-embedding-type", "rope", "--seq-length", str(args.seq_length),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--tensor-model-parallel-size", str(args.tensor_model_parallel_size),
            "--train-iters", str(2 * total + DATA_REPEATS), "--lr", "1e-3", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--log-interval", str(args.log_interval), *args.extra.split()]


def stock_config(common: list, for_gpu: bool = False):
    """The stock arm's config and tokenizer: megatron-core's ``GPTDataset`` (no role channel), checked by the
    trainer's own preflight, so both arms are validated alike (layers, precision, data) on this machine
    (``for_gpu``: as if CUDA and Transformer Engine were present, as ``--dry-run-target gpu`` does)."""
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.loop import preflight

    cfg = parse_args(common + ["--no-role-channel"])
    return cfg, preflight(cfg, for_gpu=for_gpu)


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    import pretrain_anchor as pa
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.data import build_data
    from megatron_anchor.training.loop import setup

    if args.data_path:
        prefix, tok = args.data_path, args.tokenizer_model
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ap.error("under torchrun pass --data-path and --tokenizer-model (e.g. the dataset a single-process run "
                 "printed)")
    else:
        prefix, tok = build_dataset(tempfile.mkdtemp(prefix="bench_trainer_"))
        print(f"dataset: --data-path {prefix} --tokenizer-model {tok}")
    common = common_flags(args, prefix, tok)
    ours_cfg = parse_args(common + ["--loss-mask-policy", args.policy])
    tr = setup(ours_cfg, pa.model_provider, pa.train_valid_test_datasets_provider, pa.forward_step_factory)

    from megatron.core import parallel_state as ps

    stock_cfg, stock_tokenizer = stock_config(common)
    stock_iter, _ = build_data(stock_cfg, stock_tokenizer, 0, ps.get_data_parallel_rank(),
                               ps.get_data_parallel_world_size())

    times = {"ours": [], "stock": []}
    ours_block(tr, args.warmup)
    for _ in range(args.warmup):
        stock_step(tr, stock_iter, tr.device)
    done = 0
    while done < args.steps:
        n = min(args.block, args.steps - done)
        times["ours"].extend(ours_block(tr, n))
        for _ in range(n):
            start = time.perf_counter()
            stock_step(tr, stock_iter, tr.device)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times["stock"].append(time.perf_counter() - start)
        done += n

    data_ms = _data_path_cost(ours_cfg, stock_cfg, tr, args)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    mean = {k: statistics.fmean(v) * 1000 for k, v in times.items()}
    ratio = med["ours"] / med["stock"]
    tokens = args.global_batch_size * args.seq_length
    if dist.get_rank() == 0:
        print(f"model: {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, global batch "
              f"{args.global_batch_size}, TP {args.tensor_model_parallel_size}, world {dist.get_world_size()}, "
              f"torch threads {torch.get_num_threads()}")
        for k in ("stock", "ours"):
            print(f"{k:>6}: median {med[k]:8.2f} ms/step  mean {mean[k]:8.2f} ms/step  "
                  f"{tokens / med[k] * 1000:9.1f} tokens/s  ({len(times[k])} steps)")
        print(f"ratio ours/stock (median step time): {ratio:.4f}  (target <= 1.03)")
        extra = data_ms["ours"] - data_ms["stock"]
        bound = 1.0 + extra / med["stock"]
        print(f"data + mask path per step (isolated, median of {DATA_REPEATS}): stock {data_ms['stock']:.3f} ms, "
              f"ours {data_ms['ours']:.3f} ms -> +{extra:.3f} ms = ratio {bound:.4f} of the stock step")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"median_ms": med, "mean_ms": mean, "ratio": ratio, "data_path_ms": data_ms,
                           "data_path_ratio": bound, "steps": {k: [1000 * x for x in v] for k, v in times.items()},
                           "args": vars(args)}, fh, indent=2)
    from megatron_anchor.training.initialize import shutdown

    shutdown()
    return 0


def _data_path_cost(ours_cfg, stock_cfg, tr, args):
    """Median ms to fetch one step's micro-batches and build its loss mask, per arm (no model).

    The model's compute is identical in both arms, so this isolates what the role channel, the reader's hand-over
    and the policy add."""
    import torch

    from megatron_anchor.training.batch import current_plan, distribute
    from megatron_anchor.training.data import build_datasets, build_iterator
    from megatron_anchor.training.loss import apply_policy, loss_func, policy_table

    n_micro = args.global_batch_size // args.micro_batch_size
    out = {}
    for name, cfg in (("stock", stock_cfg), ("ours", ours_cfg)):
        train_ds = build_datasets(cfg, _tokenizer(cfg))[0]
        it = build_iterator(train_ds, 0, cfg, 0, 1)
        table = policy_table(args.policy) if name == "ours" else None
        if name == "ours":
            it = distribute(it, current_plan(1, "none"), tr.device)[0]
        samples = []
        for _ in range(DATA_REPEATS):
            start = time.perf_counter()
            for _ in range(n_micro):
                batch = next(it)
                roles = batch.get("roles") if table is not None else None
                mask = apply_policy(batch["loss_mask"].to(tr.device), roles, table)
                fake = torch.zeros(batch["labels"].shape, device=tr.device)
                loss_func(mask, roles, fake, report_role_losses=table is not None and args.policy == "pretrain")
            samples.append((time.perf_counter() - start) * 1000)
        out[name] = statistics.median(samples)
    return out


def _tokenizer(cfg):
    from megatron_anchor.training.data import build_tokenizer

    return build_tokenizer(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
