"""The training loop: megatron-core's forward/backward schedules, DDP, optimizer and LR schedule.

``pretrain(cfg, model_provider, datasets_provider, forward_step_factory)`` is what ``pretrain_anchor.py``
calls. Every check that can fail (flags, layout, data files, role channels) runs before the first step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_anchor.training import checkpointing, guards, initialize
from megatron_anchor.training.arguments import validate
from megatron_anchor.training.loss import boundary_mode
from megatron_anchor.training.config import AnchorConfig
from megatron_anchor.training.loss import REPORT_KEYS
from megatron_anchor.training.model import has_transformer_engine, num_parameters
from megatron_anchor.training.monitor import Monitor, format_train_line

# Metrics reduced exactly over micro-batches and data-parallel ranks as [sum, count] pairs.
REDUCED_KEYS = REPORT_KEYS


@dataclass
class RunResult:
    """What a run did; identical on every rank (losses are broadcast from the last pipeline stage)."""

    train: List[Dict[str, Optional[float]]] = field(default_factory=list)
    """Per-iteration metrics (iteration, the REDUCED_KEYS losses, lr, grad norm)."""
    valid: List[Dict[str, Optional[float]]] = field(default_factory=list)
    """Per-evaluation metrics."""
    final_state: Optional[checkpointing.TrainState] = None
    exit_reason: Optional[str] = None
    """Why the run stopped before --train-iters (a signal, the time budget, --exit-interval), else None."""


@dataclass
class Trainer:
    """Everything the loop holds after setup (model chunks, optimizer, schedule, data, hooks)."""

    cfg: AnchorConfig
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    state: checkpointing.TrainState
    train_iter: object
    make_valid_iter: Callable
    forward_step: Callable
    monitor: Monitor
    device: torch.device
    tokenizer_record: Optional[dict] = None
    """Written into every --save directory, so generation, export and fine-tuning can check their tokenizer."""


def _wrap_ddp(cfg: AnchorConfig, model: torch.nn.Module):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.training.bf16,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        # Gradients are token sums: divide once by the global token count, never by the DP size.
        average_in_collective=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def _build_optimizer(cfg: AnchorConfig, model: List[torch.nn.Module]):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.training
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.lr_warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.lr_decay_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=t.lr_wsd_decay_iters,
        lr_wsd_decay_style="linear" if t.lr_decay_style == "WSD" else None,
    )
    return optimizer, scheduler


def preflight(cfg: AnchorConfig, for_gpu: bool = False):
    """Every check that needs no process group: flags for this world size, the tokenizer, data files, role
    channel headers, tokenizer records, and a ``--load`` checkpoint's architecture. Runs identically on every
    rank, so a bad run fails in seconds, before any collective. Returns the run's tokenizer.

    ``for_gpu`` validates as if CUDA and Transformer Engine were present (``--dry-run-target gpu``)."""
    from megatron_anchor.training.data import build_tokenizer, check_data_paths, run_tokenizer_record

    validate(cfg, initialize.world_size_from_env(), for_gpu or torch.cuda.is_available(),
             for_gpu or has_transformer_engine())
    tokenizer = build_tokenizer(cfg)
    check_data_paths(cfg, tokenizer)
    if cfg.checkpoint.load:
        checkpointing.check_compatible(cfg, cfg.checkpoint.load, run_tokenizer_record(cfg, tokenizer))
    return tokenizer


def dry_run(cfg: AnchorConfig) -> RunResult:
    """``--dry-run``: :func:`preflight`, then print the resolved configuration as YAML (no model, no step)."""
    import io

    import yaml

    from megatron_anchor.training.arguments import config_dict

    preflight(cfg, for_gpu=cfg.training.dry_run_target == "gpu")
    out = io.StringIO()
    yaml.safe_dump(config_dict(cfg), out, sort_keys=False)
    print(f"# dry run: configuration valid for world size {initialize.world_size_from_env()}", flush=True)
    print(out.getvalue(), end="", flush=True)
    return RunResult()


def setup(cfg: AnchorConfig, model_provider: Callable, datasets_provider: Callable,
          forward_step_factory: Callable) -> Trainer:
    """Validate, initialise process groups, build model/optimizer, load a checkpoint and the data.

    ``model_provider(cfg, vocab_size, pre_process, post_process)``; ``datasets_provider(cfg, tokenizer,
    consumed_samples, dp_rank, dp_size) -> (train_iter, make_valid_iter)``; ``forward_step_factory(cfg,
    device) -> forward_step``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    from megatron_anchor.training.data import run_tokenizer_record, scan_role_channels

    tokenizer = preflight(cfg)
    initialize.initialize_distributed(cfg)
    initialize.set_seeds(cfg.training.seed)
    device = initialize.device()
    # Role codes: every byte read once per job, each rank a share, one verdict for all.
    scan_role_channels(cfg, device)

    model = model_provider(cfg, tokenizer.vocab_size, pre_process=ps.is_pipeline_first_stage(),
                           post_process=ps.is_pipeline_last_stage())
    model.to(device)
    model = [_wrap_ddp(cfg, model)]
    # Schedules find these hooks on the model config.
    mcfg = model[0].config
    mcfg.finalize_model_grads_func = finalize_model_grads
    mcfg.no_sync_func = model[0].no_sync
    optimizer, scheduler = _build_optimizer(cfg, model)
    mcfg.grad_scale_func = optimizer.scale_loss

    ck = cfg.checkpoint
    state = checkpointing.TrainState()
    if ck.load:
        state = checkpointing.load_checkpoint(ck.load, model, optimizer, scheduler, finetune=ck.finetune,
                                              load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng)

    train_iter, make_valid_iter = datasets_provider(cfg, tokenizer, state.consumed_train_samples,
                                                    ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    monitor = Monitor(cfg, is_logging_rank=dist.get_rank() == dist.get_world_size() - 1)
    monitor.print(
        f"megatron-anchor: world {dist.get_world_size()} = TP {ps.get_tensor_model_parallel_world_size()} x "
        f"PP {ps.get_pipeline_model_parallel_world_size()} x DP {ps.get_data_parallel_world_size()}, "
        f"{cfg.model.transformer_impl} layers, vocab {tokenizer.vocab_size} (padded "
        f"{_unwrap(model[0]).vocab_size}), {num_parameters(model[0])} parameters on the last rank, "
        f"policy {_policy_line(cfg)}, starting at iteration {state.iteration}"
    )
    forward_step = forward_step_factory(cfg, device)
    return Trainer(cfg, model, optimizer, scheduler, state, train_iter, make_valid_iter, forward_step,
                   monitor, device, run_tokenizer_record(cfg, tokenizer))


def _policy_line(cfg: AnchorConfig) -> str:
    t, d = cfg.training, cfg.data
    if not d.replay_data_path:
        return t.loss_mask_policy
    return f"{t.loss_mask_policy}, replay {d.replay_share:.0%} under {t.replay_loss_mask_policy}"


def _unwrap(module):
    return getattr(module, "module", module)


def _reduce_losses(outputs: List[Dict[str, torch.Tensor]], device) -> Dict[str, Optional[float]]:
    """Sum [sum, count] pairs over micro-batches and DP ranks on the last stage; broadcast to every rank."""
    from megatron.core import parallel_state as ps

    packed = torch.zeros(2 * len(REDUCED_KEYS), dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage():
        for out in outputs:
            for i, key in enumerate(REDUCED_KEYS):
                if key in out:
                    packed[2 * i: 2 * i + 2] += out[key].to(device=device, dtype=torch.float64)
        dist.all_reduce(packed, group=ps.get_data_parallel_group())
    # The last global rank is on the last pipeline stage (megatron orders pp outermost).
    dist.broadcast(packed, src=dist.get_world_size() - 1)
    result = {}
    for i, key in enumerate(REDUCED_KEYS):
        total, count = packed[2 * i].item(), packed[2 * i + 1].item()
        result[key] = total / count if count > 0 else None
        result[key + " tokens"] = count
    return result


def _forward_backward(tr: Trainer, data_iterator, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = tr.cfg
    t = cfg.training
    from megatron.core import parallel_state as ps

    num_microbatches = t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())
    seq, mbs = cfg.model.seq_length, t.micro_batch_size
    if boundary_mode(cfg.data.reset_attention_mask, cfg.model.transformer_impl) == "thd":
        # THD flattens a micro-batch into one packed sequence: pipeline stages exchange [b*s, 1, h] tensors.
        seq, mbs = seq * mbs, 1
    return get_forward_backward_func()(
        forward_step_func=tr.forward_step,
        data_iterator=data_iterator,
        model=tr.model,
        num_microbatches=num_microbatches,
        seq_length=seq,
        micro_batch_size=mbs,
        decoder_seq_length=seq,
        forward_only=forward_only,
    )


def _local_loss_finite(outputs: List[Dict[str, torch.Tensor]], device) -> torch.Tensor:
    """Whether this rank's own loss sum over its micro-batches is finite (a 0-dim bool tensor, no host sync)."""
    if not outputs:  # not the last pipeline stage: no loss here
        return torch.tensor(True, device=device)
    total = torch.stack([out["lm loss"][0].to(device) for out in outputs]).sum()
    return torch.isfinite(total)


def train_step(tr: Trainer) -> Dict[str, Optional[float]]:
    """One optimizer step over a global batch; returns reduced losses, lr and grad norm.

    ``metrics["loss finite"]`` is this rank's own verdict on its loss (before any reduction), for the NaN check.
    """
    for chunk in tr.model:
        chunk.zero_grad_buffer()
    tr.optimizer.zero_grad()
    outputs = _forward_backward(tr, tr.train_iter, forward_only=False)
    update_ok, grad_norm, _ = tr.optimizer.step()
    if update_ok and grad_norm is None and tr.cfg.training.check_for_nan_in_loss_and_grad:
        # Without clipping megatron computes no norm; the gradients are still in place after the step.
        grad_norm = tr.optimizer.get_grad_norm()
    tr.scheduler.step(increment=1)
    metrics = _reduce_losses(outputs, tr.device)
    metrics["loss finite"] = _local_loss_finite(outputs, tr.device)
    metrics["grad norm"] = float(grad_norm) if grad_norm is not None else None
    metrics["lr"] = tr.optimizer.param_groups[0]["lr"]
    metrics["skipped"] = not update_ok
    return metrics


def _save(tr: Trainer) -> str:
    ck = tr.cfg.checkpoint
    path = checkpointing.save_checkpoint(ck.save, tr.state, tr.model, tr.optimizer, tr.scheduler,
                                         ck.ckpt_fully_parallel_save, run_config=tr.cfg,
                                         tokenizer_record=tr.tokenizer_record)
    tr.monitor.print(f"saved checkpoint at iteration {tr.state.iteration} to {path}")
    return path


def _check_finite(tr: Trainer, it: int, metrics: Dict, verdict: guards.Verdict) -> None:
    """Stop every rank alike when a loss or the gradient norm is NaN/Inf (``--check-for-nan-in-loss-and-grad``)."""
    from megatron.core import parallel_state as ps

    if verdict.bad_loss_rank is not None:
        bad = guards.ranks_where(not bool(metrics["loss finite"]), tr.device)
        raise guards.TrainingAborted(
            f"NaN or Inf in the loss at iteration {it} on rank(s) {bad} (first: rank {verdict.bad_loss_rank}, "
            f"data-parallel rank {ps.get_data_parallel_rank()} here); nothing from this step was saved: resume "
            "from the last checkpoint (e.g. with a lower --lr), or check that rank's data and hardware "
            "(--no-check-for-nan-in-loss-and-grad turns this check off)")
    norm = metrics.get("grad norm")
    if norm is not None and not math.isfinite(norm):
        bad = guards.ranks_where(not guards.local_grads_finite(tr.model), tr.device)
        raise guards.TrainingAborted(
            f"NaN or Inf in the gradients at iteration {it} (grad norm {norm}; non-finite gradients on rank(s) "
            f"{bad or 'none locally: the reduction overflowed'}); nothing from this step was saved: resume from "
            "the last checkpoint (e.g. with a lower --lr or --clip-grad), or turn the check off with "
            "--no-check-for-nan-in-loss-and-grad")


@torch.no_grad()
def evaluate(tr: Trainer) -> Optional[Dict[str, Optional[float]]]:
    """Validation losses over ``--eval-iters`` global batches (the same batches at every evaluation)."""
    iters = tr.cfg.logging.eval_iters
    data_iter = tr.make_valid_iter()
    if iters == 0 or data_iter is None:
        return None
    for chunk in tr.model:
        chunk.eval()
    outputs = []
    for _ in range(iters):
        outputs.extend(_forward_backward(tr, data_iter, forward_only=True))
    for chunk in tr.model:
        chunk.train()
    metrics = _reduce_losses(outputs, tr.device)
    loss = metrics["lm loss"]
    metrics["ppl"] = math.exp(min(loss, 20.0)) if loss is not None else None
    return metrics


def _log_valid(tr: Trainer, iteration: int, metrics: Dict[str, Optional[float]]) -> None:
    parts = [f"validation at iteration {iteration}"]
    for key in REDUCED_KEYS:
        if metrics.get(key) is not None:
            parts.append(f"{key}: {metrics[key]:.6E}")
    if metrics.get("ppl") is not None:
        parts.append(f"lm loss PPL: {metrics['ppl']:.4f}")
    tr.monitor.print(" | ".join(parts))
    tr.monitor.scalars({k: metrics.get(k) for k in (*REDUCED_KEYS, "ppl")}, iteration, prefix="valid/")


def run(tr: Trainer, on_step: Optional[Callable[[int, Dict], None]] = None) -> RunResult:
    """Train from ``tr.state`` to ``--train-iters``, evaluating, logging and saving on schedule."""
    t = tr.cfg.training
    result = RunResult()
    tokens_per_step = t.global_batch_size * tr.cfg.model.seq_length
    for chunk in tr.model:
        chunk.train()
    # The clock runs from process start: set-up (imports, data indices, a checkpoint load) spends the job's time too.
    handler = guards.ExitSignalHandler({"SIGTERM", t.exit_signal}).install() if t.exit_signal_handler else None
    try:
        return _run_steps(tr, result, on_step, handler, guards.Clock(t.exit_duration_in_mins), tokens_per_step)
    finally:
        if handler is not None:
            handler.restore()


def _run_steps(tr: Trainer, result: RunResult, on_step, handler, clock, tokens_per_step) -> RunResult:
    cfg = tr.cfg
    t, lg, ck = cfg.training, cfg.logging, cfg.checkpoint
    window_time, window_steps = 0.0, 0
    while tr.state.iteration < t.train_iters:
        start = time.perf_counter()
        metrics = train_step(tr)
        elapsed = time.perf_counter() - start
        tr.state.iteration += 1
        tr.state.consumed_train_samples += t.global_batch_size
        window_time += elapsed
        window_steps += 1
        it = tr.state.iteration
        verdict = guards.agree(tr.device, handler is not None and handler.received is not None, clock.exceeded(),
                               metrics["loss finite"] if t.check_for_nan_in_loss_and_grad else True)
        if t.check_for_nan_in_loss_and_grad:
            _check_finite(tr, it, metrics, verdict)
        metrics["loss finite"] = bool(metrics["loss finite"])
        metrics["iteration"] = it
        result.train.append(metrics)
        if on_step is not None:
            on_step(it, metrics)
        if it % lg.log_interval == 0 or it == t.train_iters:
            step_s = window_time / window_steps
            metrics["ms/step"] = 1000.0 * step_s
            metrics["tokens/s"] = tokens_per_step / step_s
            tr.monitor.print(format_train_line(it, t.train_iters, metrics))
            show = (*REDUCED_KEYS, "lr", "grad norm", "tokens/s", "ms/step")
            tr.monitor.scalars({k: metrics.get(k) for k in show}, it, prefix="train/")
            window_time, window_steps = 0.0, 0
        if lg.eval_interval and it % lg.eval_interval == 0 and it != t.train_iters:
            valid = evaluate(tr)
            if valid is not None:
                valid["iteration"] = it
                result.valid.append(valid)
                _log_valid(tr, it, valid)
        saved = bool(ck.save and ck.save_interval and it % ck.save_interval == 0)
        if saved:
            _save(tr)
        reason = _exit_reason(t, it, verdict)
        if reason and it != t.train_iters:
            if ck.save and not saved:
                _save(tr)
            tr.monitor.print(f"exiting at iteration {it}: {reason}"
                             + ("" if ck.save else " (no --save: nothing was saved)"))
            result.exit_reason = reason
            result.final_state = tr.state
            return result
    valid = evaluate(tr)
    if valid is not None:
        valid["iteration"] = tr.state.iteration
        result.valid.append(valid)
        _log_valid(tr, tr.state.iteration, valid)
    if ck.save and (not ck.save_interval or tr.state.iteration % ck.save_interval):
        _save(tr)
    result.final_state = tr.state
    return result


def _exit_reason(t, it: int, verdict: guards.Verdict) -> Optional[str]:
    """Why the run stops after iteration ``it`` (identical on every rank), or None to go on."""
    if verdict.signal_received:
        return "exit signal received (SIGTERM or --exit-signal)"
    if verdict.duration_exceeded:
        return f"--exit-duration-in-mins {t.exit_duration_in_mins} reached"
    if t.exit_interval and it % t.exit_interval == 0:
        return f"--exit-interval {t.exit_interval}"
    return None


def pretrain(cfg: AnchorConfig, model_provider: Callable, datasets_provider: Callable,
             forward_step_factory: Callable, on_step=None) -> RunResult:
    """Set up and run a training job (the entry point's one call); ``--dry-run`` only checks."""
    if cfg.training.dry_run:
        return dry_run(cfg)
    tr = setup(cfg, model_provider, datasets_provider, forward_step_factory)
    try:
        return run(tr, on_step=on_step)
    finally:
        tr.monitor.close()
