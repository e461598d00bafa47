"""The training loop: megatron-core's forward/backward schedules, DDP, optimizer and LR schedule.

``pretrain(cfg, model_provider, datasets_provider, forward_step_factory)`` is what ``pretrain_anchor.py``
calls. Every check that can fail (flags, layout, data files, role channels) runs before the first step.

Per step the host waits on the device once: the losses, the attention work for the FLOPs count, and every rank's
exit and NaN observations travel in one all-reduce whose result is read in one copy (megatron-core's optimizer
reads the gradient norm itself). Throughput (tokens/s, TFLOP/s per GPU, MFU) comes from the step time and the
model's FLOPs (:mod:`megatron_anchor.training.flops`); peak memory is gathered only on logging steps.
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
from megatron_anchor.training.batch import current_plan, distribute
from megatron_anchor.training.config import AnchorConfig
from megatron_anchor.training.flops import ModelShape, device_peak_tflops, step_flops
from megatron_anchor.training.loss import REPORT_KEYS, boundary_mode
from megatron_anchor.training.model import (build_model_chunks, build_transformer_config, has_transformer_engine,
                                            log_fusions, num_parameters, resolve_fusions, vocab_rows)
from megatron_anchor.training.monitor import Monitor, StepProfiler, format_train_line, peak_memory_bytes
from megatron_anchor.training.packing import rank_token_multiple

# Metrics reduced exactly over micro-batches and data-parallel ranks as [sum, count] pairs.
REDUCED_KEYS = REPORT_KEYS


@dataclass
class RunResult:
    """What a run did; identical on every rank (losses are reduced over all ranks)."""

    train: List[Dict[str, Optional[float]]] = field(default_factory=list)
    """Per-iteration metrics (iteration, the REDUCED_KEYS losses, lr, grad norm; on logging steps also tokens/s,
    TFLOP/s/GPU, MFU, peak memory)."""
    valid: List[Dict[str, Optional[float]]] = field(default_factory=list)
    """Per-evaluation metrics."""
    final_state: Optional[checkpointing.TrainState] = None
    exit_reason: Optional[str] = None
    """Why the run stopped before --train-iters (a signal, the time budget, --exit-interval), else None."""
    profile_trace: Optional[str] = None
    """The trace file ``--profile`` wrote on this rank, if any."""


@dataclass
class Trainer:
    """Everything the loop holds after setup (model chunks, optimizer, schedule, data, hooks)."""

    cfg: AnchorConfig
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    state: checkpointing.TrainState
    train_iter: object
    """What the schedule gets: one iterator (or None on a stage that uses no data), or one per model chunk."""
    make_valid_iter: Callable
    forward_step: Callable
    monitor: Monitor
    device: torch.device
    tokenizer_record: Optional[dict] = None
    """Written into every --save directory, so generation, export and fine-tuning can check their tokenizer."""
    source: Optional[object] = None
    """The training :class:`~megatron_anchor.training.batch.MicroBatchSource` (counts attention work)."""
    valid_enabled: bool = True
    shape: Optional[ModelShape] = None
    peak_tflops: Optional[float] = None
    """One device's peak for MFU (detected or --peak-tflops; None on CPU)."""
    param_sync_func: Optional[object] = None
    """megatron-core's aligned parameter gather, held back until the first step succeeded (overlapped gather)."""
    gather_pending: bool = False
    """With --overlap-param-gather: the forward hooks are off until the first step succeeded (Megatron-LM)."""
    step_returns_norm: bool = True
    """Whether ``optimizer.step()`` returns the real gradient norm: megatron-core's ChainedOptimizer always computes
    it; a bare optimizer only when it clips (--clip-grad > 0)."""


def ddp_config(cfg: AnchorConfig):
    """megatron-core's DistributedDataParallelConfig for this run (as Megatron-LM's training.py fills it)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_anchor.training.model import num_model_chunks

    p, t = cfg.parallel, cfg.training
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=t.bf16 or p.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        # With the interleaved schedule every pipeline stage launches its chunks' parameter gathers from the
        # schedule (param_sync_func); the forward pre-hooks then must not dispatch the next bucket themselves.
        align_param_gather=p.overlap_param_gather and num_model_chunks(cfg) > 1,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # Gradients are token sums: divide once by the global token count, never by the DP size.
        average_in_collective=False,
    )


def _wrap_ddp(cfg: AnchorConfig, model: torch.nn.Module, config, disable_bucketing: bool = False):
    from megatron.core.distributed import DistributedDataParallel

    # Later virtual pipeline chunks get one bucket each (Megatron-LM): their gradients are ready only at the end.
    return DistributedDataParallel(config=config, ddp_config=ddp_config(cfg), module=model,
                                   disable_bucketing=disable_bucketing)


def _build_optimizer(cfg: AnchorConfig, model: List[torch.nn.Module]):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_anchor.training.model import params_dtype

    t, p = cfg.training, cfg.parallel
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
        fp16=t.fp16,
        params_dtype=params_dtype(cfg),
        loss_scale=t.loss_scale,
        initial_loss_scale=t.initial_loss_scale,
        min_loss_scale=t.min_loss_scale,
        loss_scale_window=t.loss_scale_window,
        hysteresis=t.hysteresis,
        use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
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
    from megatron_anchor.training.run_checks import check_run_files

    validate(cfg, initialize.world_size_from_env(), for_gpu or torch.cuda.is_available(),
             for_gpu or has_transformer_engine())
    tokenizer = build_tokenizer(cfg)
    check_data_paths(cfg, tokenizer)
    check_run_files(cfg)
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


def _install_schedule_hooks(cfg: AnchorConfig, model: List[torch.nn.Module]) -> Optional[object]:
    """The hooks megatron-core's schedules find on the model config (as Megatron-LM's training.py sets them);
    returns the parameter-gather hook, which the loop installs after the first successful step."""
    from megatron.core.distributed import finalize_model_grads

    mcfg = model[0].config
    one = len(model) == 1
    mcfg.finalize_model_grads_func = finalize_model_grads
    mcfg.no_sync_func = model[0].no_sync if one else [chunk.no_sync for chunk in model]
    if cfg.parallel.overlap_grad_reduce:
        mcfg.grad_sync_func = model[0].start_grad_sync if one else [chunk.start_grad_sync for chunk in model]
    param_sync = None
    if cfg.parallel.overlap_param_gather and not one:
        # Aligned parameter gathers only exist in the interleaved schedule.
        param_sync = [chunk.start_param_sync for chunk in model]
    if cfg.parallel.overlap_param_gather:
        # No gather before the first step: a broken load or initialisation must not spread through it.
        for chunk in model:
            chunk.disable_forward_pre_hook(param_sync=False)
    return param_sync


def setup(cfg: AnchorConfig, model_provider: Callable, datasets_provider: Callable,
          forward_step_factory: Callable) -> Trainer:
    """Validate, initialise process groups, build model/optimizer, load a checkpoint and the data.

    ``model_provider(cfg, vocab_size, pre_process, post_process, vp_stage=None, config=None)``;
    ``datasets_provider(cfg, tokenizer, consumed_samples, dp_rank, dp_size, reads=True) -> (train_iter,
    make_valid_iter)`` (``reads=False``: this rank receives its batches and must read nothing);
    ``forward_step_factory(cfg, device) -> forward_step``.
    """
    from megatron.core import parallel_state as ps

    from megatron_anchor.training.data import run_tokenizer_record, scan_role_channels, validation_enabled

    tokenizer = preflight(cfg)
    initialize.initialize_distributed(cfg)
    initialize.check_distributed_optimizer_backend(cfg)
    initialize.set_seeds(cfg.training.seed)
    device = initialize.device()
    # Role codes: every byte read once per job, each rank a share, one verdict for all.
    scan_role_channels(cfg, device)
    monitor = Monitor(cfg, is_logging_rank=dist.get_rank() == dist.get_world_size() - 1)

    fusions = resolve_fusions(cfg)
    log_fusions(fusions, monitor.print)
    config = build_transformer_config(cfg, fusions=fusions)
    chunks = build_model_chunks(cfg, tokenizer.vocab_size, model_provider, device, config)
    model = [_wrap_ddp(cfg, chunk, config, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    param_sync = _install_schedule_hooks(cfg, model)
    optimizer, scheduler = _build_optimizer(cfg, model)
    model[0].config.grad_scale_func = optimizer.scale_loss

    ck = cfg.checkpoint
    state = checkpointing.TrainState()
    if ck.load:
        state = checkpointing.load_checkpoint(ck.load, model, optimizer, scheduler, finetune=ck.finetune,
                                              load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng,
                                              fully_parallel=ck.ckpt_fully_parallel_load)

    mode = boundary_mode(cfg.data.reset_attention_mask, cfg.model.transformer_impl)
    plan = current_plan(len(model), mode, rank_token_multiple(cfg.parallel.tensor_model_parallel_size,
                                                              cfg.parallel.sequence_parallel,
                                                              bool(cfg.performance.fp8_format)))
    train_loader, make_valid_loader = datasets_provider(
        cfg, tokenizer, state.consumed_train_samples, ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(), reads=plan.reads)
    train_iter, source = distribute(train_loader, plan, device)

    def make_valid_iter():
        return distribute(make_valid_loader(), plan, device)[0]

    padded = vocab_rows(cfg, tokenizer.vocab_size)
    monitor.print(
        f"megatron-anchor: world {dist.get_world_size()} = TP {ps.get_tensor_model_parallel_world_size()} x "
        f"PP {ps.get_pipeline_model_parallel_world_size()} x CP {ps.get_context_parallel_world_size()} x "
        f"DP {ps.get_data_parallel_world_size()}, {len(model)} model chunk(s) per rank, "
        f"{cfg.model.transformer_impl} layers, {_precision_name(cfg)}, vocab {tokenizer.vocab_size} (padded "
        f"{padded}), {num_parameters(model)} parameters on the last rank, policy {_policy_line(cfg)}, "
        f"starting at iteration {state.iteration}"
    )
    if cfg.training.exit_signal_handler:
        for problem in guards.launcher_signal_problems(cfg.training.exit_signal, bool(ck.save)):
            monitor.print(f"warning: {problem}")
    forward_step = forward_step_factory(cfg, device)
    return Trainer(cfg, model, optimizer, scheduler, state, train_iter, make_valid_iter, forward_step,
                   monitor, device, run_tokenizer_record(cfg, tokenizer), source=source,
                   valid_enabled=validation_enabled(cfg), shape=ModelShape.from_config(cfg.model, padded),
                   peak_tflops=device_peak_tflops(cfg.logging.peak_tflops), param_sync_func=param_sync,
                   gather_pending=cfg.parallel.overlap_param_gather,
                   step_returns_norm=_step_returns_norm(optimizer, cfg.training.clip_grad))


def _step_returns_norm(optimizer, clip_grad: float) -> bool:
    from megatron.core.optimizer import ChainedOptimizer

    return clip_grad > 0 or isinstance(optimizer, ChainedOptimizer)


def _policy_line(cfg: AnchorConfig) -> str:
    t, d = cfg.training, cfg.data
    if not d.replay_data_path:
        return t.loss_mask_policy
    return f"{t.loss_mask_policy}, replay {d.replay_share:.0%} under {t.replay_loss_mask_policy}"


def _precision_name(cfg: AnchorConfig) -> str:
    t, f = cfg.training, cfg.performance
    name = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    return name + (f" + fp8 {f.fp8_format}" if f.fp8_format else "")


def _num_microbatches(cfg: AnchorConfig) -> int:
    from megatron.core import parallel_state as ps

    t = cfg.training
    return t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())


def _forward_backward(tr: Trainer, data_iterator, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cfg = tr.cfg
    seq, mbs = cfg.model.seq_length, cfg.training.micro_batch_size
    if boundary_mode(cfg.data.reset_attention_mask, cfg.model.transformer_impl) == "thd":
        # THD flattens a micro-batch into one packed sequence: pipeline stages exchange [b*s, 1, h] tensors
        # (megatron-core divides the length by the context-parallel size itself).
        seq, mbs = seq * mbs, 1
    if len(tr.model) > 1 and not isinstance(data_iterator, list):
        raise ValueError("with virtual pipeline stages the schedule needs one data iterator per model chunk "
                         "(megatron_anchor.training.batch.distribute builds them)")
    return get_forward_backward_func()(
        forward_step_func=tr.forward_step,
        data_iterator=data_iterator,
        model=tr.model if len(tr.model) > 1 else tr.model[0],
        num_microbatches=_num_microbatches(cfg),
        seq_length=seq,
        micro_batch_size=mbs,
        decoder_seq_length=seq,
        forward_only=forward_only,
    )


@dataclass
class StepReduction:
    """One step's numbers after the single all-reduce: identical on every rank."""

    losses: Dict[str, Optional[float]]
    """Each REDUCED_KEYS entry's token mean (None without tokens) and its token count (``<key> tokens``)."""
    attention_squares: float
    """``sum L^2`` over the step's documents, all data-parallel ranks (0 when not counted)."""
    signal_received: bool
    duration_exceeded: bool
    bad_loss: bool
    """Some rank's own loss sum was NaN or Inf."""
    local_loss: Optional[torch.Tensor] = None
    """This rank's own loss sum (a device tensor; read only on the error path)."""

    def local_loss_bad(self) -> bool:
        """Whether this rank's own loss was NaN/Inf (a device-to-host copy: error path only)."""
        return self.local_loss is not None and not bool(torch.isfinite(self.local_loss))


def _reduce_step(tr: Trainer, outputs: List[Dict[str, torch.Tensor]], signal_received: bool = False,
                 duration_exceeded: bool = False, attention_squares: int = 0) -> StepReduction:
    """Sum [sum, count] pairs over micro-batches and ranks, with the step's attention work and every rank's
    exit/NaN flags, in one all-reduce over all ranks and one device-to-host copy.

    Losses come from the last pipeline stage's tensor-parallel rank 0 of every data- and context-parallel rank
    (tensor-parallel ranks hold copies; context-parallel ranks hold parts of each sequence's loss)."""
    from megatron.core import parallel_state as ps

    n = len(REDUCED_KEYS)
    packed = torch.zeros(2 * n + 4, dtype=torch.float64, device=tr.device)
    local_loss = None
    if outputs:
        local_loss = torch.stack([out["lm loss"][0].to(device=tr.device, dtype=torch.float64) for out in outputs]).sum()
        if ps.get_tensor_model_parallel_rank() == 0:
            for out in outputs:
                for i, key in enumerate(REDUCED_KEYS):
                    if key in out:
                        packed[2 * i: 2 * i + 2] += out[key].to(device=tr.device, dtype=torch.float64)
        packed[2 * n + 3] = (~torch.isfinite(local_loss)).to(torch.float64)
    # fill_ passes each host number to the device as a kernel argument: no host-to-device copy, no wait.
    packed[2 * n].fill_(float(attention_squares))
    packed[2 * n + 1].fill_(float(signal_received))
    packed[2 * n + 2].fill_(float(duration_exceeded))
    if dist.get_world_size() > 1:
        dist.all_reduce(packed)
    values = packed.tolist()
    losses: Dict[str, Optional[float]] = {}
    for i, key in enumerate(REDUCED_KEYS):
        total, count = values[2 * i], values[2 * i + 1]
        losses[key] = total / count if count > 0 else None
        losses[key + " tokens"] = count
    return StepReduction(losses, values[2 * n], values[2 * n + 1] > 0, values[2 * n + 2] > 0, values[2 * n + 3] > 0,
                         local_loss)


def train_step(tr: Trainer, signal_received: bool = False, duration_exceeded: bool = False):
    """One optimizer step over a global batch: ``(metrics, reduction)``.

    ``metrics`` holds the reduced losses, lr, grad norm, whether the update was skipped (fp16 overflow) and the
    loss scale; ``reduction`` (:class:`StepReduction`) also the agreed exit and NaN flags."""
    for chunk in tr.model:
        chunk.zero_grad_buffer()
    tr.optimizer.zero_grad()
    outputs = _forward_backward(tr, tr.train_iter, forward_only=False)
    update_ok, grad_norm, _ = tr.optimizer.step()
    if update_ok and not tr.step_returns_norm:
        # Without clipping a bare megatron optimizer computes no norm (None, or 0.0 from the mixed-precision
        # ones); the gradients are still in place after the step.
        grad_norm = tr.optimizer.get_grad_norm() if tr.cfg.training.check_for_nan_in_loss_and_grad else None
    if update_ok:
        tr.scheduler.step(increment=1)
    squares = 0
    if tr.source is not None:
        squares, tr.source.attention_squares = tr.source.attention_squares, 0
    red = _reduce_step(tr, outputs, signal_received, duration_exceeded, squares)
    metrics = dict(red.losses)
    metrics["grad norm"] = float(grad_norm) if grad_norm is not None else None
    metrics["lr"] = tr.optimizer.param_groups[0]["lr"]
    metrics["skipped"] = not update_ok
    if tr.cfg.training.fp16:
        metrics["loss scale"] = float(tr.optimizer.get_loss_scale())
    return metrics, red


def _save(tr: Trainer) -> str:
    ck = tr.cfg.checkpoint
    with _params_synced(tr):
        path = checkpointing.save_checkpoint(ck.save, tr.state, tr.model, tr.optimizer, tr.scheduler,
                                             ck.ckpt_fully_parallel_save, run_config=tr.cfg,
                                             tokenizer_record=tr.tokenizer_record,
                                             metadata=checkpointing.optimizer_metadata(tr.cfg))
    tr.monitor.print(f"saved checkpoint at iteration {tr.state.iteration} to {path}")
    return path


class _params_synced:
    """With the overlapped parameter gather, finish the pending gather and pause the forward hooks (evaluation,
    checkpoints), as Megatron-LM does; a no-op otherwise."""

    def __init__(self, tr: Trainer):
        self.tr = tr
        self.active = tr.cfg.parallel.overlap_param_gather

    def __enter__(self):
        # Before the first successful step the hooks are already off and the weights are the loaded (or initial)
        # ones, which no update has touched: nothing to gather (fp16 skips steps while the loss scale settles).
        self.active = self.active and not self.tr.gather_pending
        if self.active:
            prepare = getattr(self.tr.optimizer, "prepare_model_params_for_param_sync", None)
            if prepare is not None:
                prepare()
            for chunk in self.tr.model:
                chunk.disable_forward_pre_hook(param_sync=True)

    def __exit__(self, *exc):
        if self.active:
            for chunk in self.tr.model:
                chunk.enable_forward_pre_hook()


def _check_finite(tr: Trainer, it: int, metrics: Dict, red: StepReduction) -> None:
    """Stop every rank alike when a loss or the gradient norm is NaN/Inf (``--check-for-nan-in-loss-and-grad``)."""
    from megatron.core import parallel_state as ps

    if red.bad_loss:
        bad = guards.ranks_where(red.local_loss_bad(), tr.device)
        raise guards.TrainingAborted(
            f"NaN or Inf in the loss at iteration {it} on rank(s) {bad} (first: rank {bad[0] if bad else '?'}, "
            f"data-parallel rank {ps.get_data_parallel_rank()} here); nothing from this step was saved: resume "
            "from the last checkpoint (e.g. with a lower --lr), or check that rank's data and hardware "
            "(--no-check-for-nan-in-loss-and-grad turns this check off)")
    norm = metrics.get("grad norm")
    if norm is not None and not math.isfinite(norm) and not tr.cfg.training.fp16:
        # (fp16 overflows are the loss scaler's job: it skips the step and lowers the scale.)
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
    if iters == 0 or not tr.valid_enabled:
        return None
    data_iter = tr.make_valid_iter()
    for chunk in tr.model:
        chunk.eval()
    outputs = []
    with _params_synced(tr):
        for _ in range(iters):
            outputs.extend(_forward_backward(tr, data_iter, forward_only=True))
    for chunk in tr.model:
        chunk.train()
    metrics = _reduce_step(tr, outputs).losses
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


def peak_memory_over_ranks(device) -> tuple:
    """``(bytes, rank)`` of the largest per-rank peak memory (one world-sized all-reduce; logging steps only)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    peaks = torch.zeros(world, dtype=torch.float64, device=device)
    peaks[rank] = float(peak_memory_bytes())
    if world > 1:
        dist.all_reduce(peaks)
    values = peaks.tolist()
    top = max(range(world), key=lambda r: values[r])
    return values[top], top


def throughput(tr: Trainer, step_seconds: float, attention_squares: float) -> Dict[str, Optional[float]]:
    """tokens/s, TFLOP/s per GPU and MFU of steps that took ``step_seconds`` each on average, with the window's
    mean attention work per step (``sum L^2``; 0: unpacked sequences of ``--seq-length``)."""
    cfg = tr.cfg
    t, seq = cfg.training, cfg.model.seq_length
    tokens = t.global_batch_size * seq
    squares = attention_squares or t.global_batch_size * seq * seq
    flops = step_flops(tr.shape, tokens, squares)
    tflops = flops / step_seconds / dist.get_world_size() / 1e12
    return {"tokens/s": tokens / step_seconds, "TFLOP/s/GPU": tflops,
            "MFU": tflops / tr.peak_tflops if tr.peak_tflops else None}


def run(tr: Trainer, on_step: Optional[Callable[[int, Dict], None]] = None, steps: Optional[int] = None) -> RunResult:
    """Train from ``tr.state`` to ``--train-iters``, evaluating, logging and saving on schedule.

    ``steps``: return after this many iterations, as a pause (no end-of-run evaluation or save; ``run`` again
    continues), for benchmarks and embedding applications."""
    t = tr.cfg.training
    result = RunResult()
    for chunk in tr.model:
        chunk.train()
    # The clock runs from process start: set-up (imports, data indices, a checkpoint load) spends the job's time too.
    handler = guards.ExitSignalHandler({"SIGTERM", t.exit_signal}).install() if t.exit_signal_handler else None
    profiler = StepProfiler(tr.cfg, dist.get_rank())
    try:
        return _run_steps(tr, result, on_step, handler, guards.Clock(t.exit_duration_in_mins), profiler, steps)
    finally:
        profiler.close()
        result.profile_trace = profiler.written
        if handler is not None:
            handler.restore()


def _run_steps(tr: Trainer, result: RunResult, on_step, handler, clock, profiler, steps=None) -> RunResult:
    cfg = tr.cfg
    t, lg, ck = cfg.training, cfg.logging, cfg.checkpoint
    window_time, window_steps, window_squares, skipped = 0.0, 0, 0.0, 0
    check_nan = t.check_for_nan_in_loss_and_grad
    while tr.state.iteration < t.train_iters:
        it = tr.state.iteration + 1
        profiler.before_step(it)
        start = time.perf_counter()
        metrics, red = train_step(tr, handler is not None and handler.received is not None, clock.exceeded())
        elapsed = time.perf_counter() - start
        profiler.after_step(it)
        if check_nan:
            _check_finite(tr, it, metrics, red)
        if tr.gather_pending and not metrics["skipped"]:
            # The first successful step: from now on parameters are gathered while the next forward runs.
            for chunk in tr.model:
                chunk.enable_forward_pre_hook()
            tr.model[0].config.param_sync_func, tr.param_sync_func = tr.param_sync_func, None
            tr.gather_pending = False
        tr.state.iteration = it
        tr.state.consumed_train_samples += t.global_batch_size
        window_time += elapsed
        window_steps += 1
        window_squares += red.attention_squares
        skipped += int(metrics["skipped"])
        metrics["iteration"] = it
        result.train.append(metrics)
        if on_step is not None:
            on_step(it, metrics)
        if it % lg.log_interval == 0 or it == t.train_iters:
            step_s = window_time / window_steps
            metrics["ms/step"] = 1000.0 * step_s
            metrics.update(throughput(tr, step_s, window_squares / window_steps))
            peak, peak_rank = peak_memory_over_ranks(tr.device)
            metrics["peak memory GiB"], metrics["peak memory rank"] = peak / 2 ** 30, peak_rank
            metrics["skipped iterations"] = skipped
            tr.monitor.print(format_train_line(it, t.train_iters, metrics, REDUCED_KEYS))
            show = (*REDUCED_KEYS, "lr", "grad norm", "loss scale", "tokens/s", "TFLOP/s/GPU", "MFU",
                    "peak memory GiB", "ms/step")
            tr.monitor.scalars({k: metrics.get(k) for k in show}, it, prefix="train/")
            window_time, window_steps, window_squares, skipped = 0.0, 0, 0.0, 0
        if lg.eval_interval and it % lg.eval_interval == 0 and it != t.train_iters:
            valid = evaluate(tr)
            if valid is not None:
                valid["iteration"] = it
                result.valid.append(valid)
                _log_valid(tr, it, valid)
        saved = bool(ck.save and ck.save_interval and it % ck.save_interval == 0)
        if saved:
            _save(tr)
        reason = _exit_reason(t, it, red)
        if reason and it != t.train_iters:
            if ck.save and not saved:
                _save(tr)
            if ck.save:
                checkpointing.write_exit_record(ck.save, it, reason)
            tr.monitor.print(f"exiting at iteration {it}: {reason}"
                             + ("" if ck.save else " (no --save: nothing was saved)"))
            result.exit_reason = reason
            result.final_state = tr.state
            return result
        if steps is not None and len(result.train) == steps and it != t.train_iters:
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


def _exit_reason(t, it: int, red: StepReduction) -> Optional[str]:
    """Why the run stops after iteration ``it`` (identical on every rank), or None to go on."""
    if red.signal_received:
        return "exit signal received (SIGTERM or --exit-signal)"
    if red.duration_exceeded:
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
