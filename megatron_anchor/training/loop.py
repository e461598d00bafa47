"""The training loop: megatron-core's forward/backward schedules, DDP, optimizer and LR schedule.

``pretrain(cfg, model_provider, datasets_provider, forward_step_factory)`` is what ``pretrain_anchor.py``
calls. Every check that can fail (flags, layout, data files, role channels) runs before the first step.

The flags are validated and what they imply is derived once (:class:`~megatron_anchor.training.resolved.ResolvedRun`),
then handed to the providers and the loop. Per step the host waits on the device once: the losses, the attention
work for the FLOPs count, and every rank's exit and NaN observations travel in one all-reduce whose result is read
in one copy (:mod:`megatron_anchor.training.step`; megatron-core's optimizer reads the gradient norm itself).
Logging, evaluation, checkpoints and the exit record are callbacks (:mod:`megatron_anchor.training.callbacks`)
called in a fixed order; throughput (tokens/s, TFLOP/s per GPU, MFU) comes from the step time and the model's
FLOPs (:mod:`megatron_anchor.training.flops`); peak memory is gathered only on logging steps.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from megatron_anchor.training import checkpointing, guards, initialize
from megatron_anchor.training.batch import current_plan, distribute
from megatron_anchor.training.callbacks import Callback, CallbackList, StepInfo, loop_callbacks
from megatron_anchor.training.config import AnchorConfig
from megatron_anchor.training.flops import ModelShape, device_peak_tflops
from megatron_anchor.training.model import (build_model_chunks, build_transformer_config, has_transformer_engine,
                                            log_fusions, num_parameters, resolve_fusions)
from megatron_anchor.training.monitor import Monitor, StepProfiler
from megatron_anchor.training.packing import rank_token_multiple
from megatron_anchor.training.resolved import ResolvedRun, bind_run, resolve_run
from megatron_anchor.training.step import RunResult, StepReduction, Trainer, check_finite, train_step

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


def preflight_run(cfg: AnchorConfig, for_gpu: bool = False) -> ResolvedRun:
    """Every check that needs no process group: flags for this world size, the tokenizer, data files, role
    channel headers, tokenizer records, and a ``--load`` checkpoint's architecture. Runs identically on every
    rank, so a bad run fails in seconds, before any collective. Returns the run's
    :class:`~megatron_anchor.training.resolved.ResolvedRun`, the one derivation of the validated flags.

    ``for_gpu`` validates as if CUDA and Transformer Engine were present (``--dry-run-target gpu``)."""
    from megatron_anchor.training.data import check_data_paths
    from megatron_anchor.training.run_checks import check_run_files

    run = resolve_run(cfg, initialize.world_size_from_env(), for_gpu or torch.cuda.is_available(),
                      for_gpu or has_transformer_engine())
    check_data_paths(cfg, run.tokenizer, run=run)
    check_run_files(cfg)
    if cfg.checkpoint.load:
        checkpointing.check_compatible(cfg, cfg.checkpoint.load, run.tokenizer_record)
    return run


def preflight(cfg: AnchorConfig, for_gpu: bool = False):
    """:func:`preflight_run`, returning the run's tokenizer."""
    return preflight_run(cfg, for_gpu).tokenizer


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
    ``forward_step_factory(cfg, device) -> forward_step``. Each also gets ``run=`` (the
    :class:`~megatron_anchor.training.resolved.ResolvedRun`) when its signature has a ``run`` parameter.
    """
    from megatron.core import parallel_state as ps

    from megatron_anchor.training.data import scan_role_channels, validation_enabled

    run = preflight_run(cfg)
    tokenizer = run.tokenizer
    initialize.initialize_distributed(cfg)
    initialize.check_distributed_optimizer_backend(cfg)
    initialize.set_seeds(cfg.training.seed)
    device = initialize.device()
    # Role codes: every byte read once per job, each rank a share, one verdict for all.
    scan_role_channels(cfg, device, run=run)
    monitor = Monitor(cfg, is_logging_rank=dist.get_rank() == dist.get_world_size() - 1)

    fusions = resolve_fusions(cfg)
    log_fusions(fusions, monitor.print)
    config = build_transformer_config(cfg, fusions=fusions, run=run)
    chunks = build_model_chunks(cfg, run.vocab_size, bind_run(model_provider, run), device, config)
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

    plan = current_plan(len(model), run.boundary_mode, rank_token_multiple(cfg.parallel.tensor_model_parallel_size,
                                                              cfg.parallel.sequence_parallel,
                                                              bool(cfg.performance.fp8_format)))
    train_loader, make_valid_loader = bind_run(datasets_provider, run)(
        cfg, tokenizer, state.consumed_train_samples, ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(), reads=plan.reads)
    train_iter, source = distribute(train_loader, plan, device)

    def make_valid_iter():
        return distribute(make_valid_loader(), plan, device)[0]

    padded = run.padded_vocab_size
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
    forward_step = bind_run(forward_step_factory, run)(cfg, device)
    return Trainer(cfg, model, optimizer, scheduler, state, train_iter, make_valid_iter, forward_step,
                   monitor, device, run, source=source,
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


def run(tr: Trainer, on_step: Optional[Callable[[int, Dict], None]] = None, steps: Optional[int] = None,
        callbacks: Iterable[Callback] = ()) -> RunResult:
    """Train from ``tr.state`` to ``--train-iters``, evaluating, logging and saving on schedule.

    ``on_step(iteration, metrics)`` runs after every step, first of the callbacks; ``callbacks``
    (:class:`~megatron_anchor.training.callbacks.Callback`) run after the built-in logging, evaluation and
    checkpointing, in the order given (see :mod:`megatron_anchor.training.callbacks`). ``steps``: return after
    this many iterations, as a pause (no end-of-run evaluation or save; ``run`` again continues), for benchmarks
    and embedding applications."""
    t = tr.cfg.training
    result = RunResult()
    for chunk in tr.model:
        chunk.train()
    # The clock runs from process start: set-up (imports, data indices, a checkpoint load) spends the job's time too.
    handler = guards.ExitSignalHandler({"SIGTERM", t.exit_signal}).install() if t.exit_signal_handler else None
    profiler = StepProfiler(tr.cfg, dist.get_rank())
    try:
        return _run_steps(tr, result, loop_callbacks(on_step, callbacks), handler,
                          guards.Clock(t.exit_duration_in_mins), profiler, steps)
    finally:
        profiler.close()
        result.profile_trace = profiler.written
        if handler is not None:
            handler.restore()


def _run_steps(tr: Trainer, result: RunResult, callbacks: CallbackList, handler, clock, profiler,
               steps=None) -> RunResult:
    t = tr.cfg.training
    check_nan = t.check_for_nan_in_loss_and_grad
    callbacks.fire("pre_train", tr, result)

    def exit_flags():
        return handler is not None and handler.received is not None, clock.exceeded()

    while tr.state.iteration < t.train_iters:
        it = tr.state.iteration + 1
        profiler.before_step(it)
        start = time.perf_counter()
        metrics, red = train_step(tr, exit_flags=exit_flags)
        elapsed = time.perf_counter() - start
        profiler.after_step(it)
        # The NaN check and the switch to the overlapped parameter gather stay in the loop, not in callbacks: both
        # belong right after the optimizer step, before anything reads the step (a NaN step is never counted, logged
        # or saved; this step's evaluation and checkpoint must find the gather hooks as the next forward will).
        if check_nan:
            check_finite(tr, it, metrics, red)
        if tr.gather_pending and not metrics["skipped"]:
            # The first successful step: from now on parameters are gathered while the next forward runs.
            for chunk in tr.model:
                chunk.enable_forward_pre_hook()
            tr.model[0].config.param_sync_func, tr.param_sync_func = tr.param_sync_func, None
            tr.gather_pending = False
        tr.state.iteration = it
        tr.state.consumed_train_samples += t.global_batch_size
        metrics["iteration"] = it
        result.train.append(metrics)
        step = StepInfo(it, metrics, red, elapsed)
        callbacks.fire("post_step", tr, result, step)
        # Decided from the step's one all-reduce, identical on every rank: no collective of its own.
        reason = _exit_reason(t, it, red)
        if reason and it != t.train_iters:
            callbacks.fire("pre_exit", tr, result, step, reason)
            result.exit_reason = reason
            result.final_state = tr.state
            return result
        if steps is not None and len(result.train) == steps and it != t.train_iters:
            result.final_state = tr.state
            return result
    callbacks.fire("post_train", tr, result)
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
             forward_step_factory: Callable, on_step=None, callbacks: Iterable[Callback] = ()) -> RunResult:
    """Set up and run a training job (the entry point's one call); ``--dry-run`` only checks. ``on_step`` and
    ``callbacks``: see :func:`run`."""
    if cfg.training.dry_run:
        return dry_run(cfg)
    tr = setup(cfg, model_provider, datasets_provider, forward_step_factory)
    try:
        return run(tr, on_step=on_step, callbacks=callbacks)
    finally:
        tr.monitor.close()
