"""Checkpoints with megatron-core dist_checkpointing: model, optimizer, LR schedule, RNG and data position.

Layout: ``SAVE/iter_0000100/`` (a dist_checkpointing directory) and ``SAVE/latest_checkpointed_iteration.txt``,
written only after every rank finished writing, so a run killed mid-save resumes from the previous one.
Model and optimizer tensors are saved as sharded tensors keyed by their place in the whole model (global layer
numbers), so a checkpoint loads under a different TP/PP layout and with or without virtual pipeline stages: one
model chunk per rank is saved under ``model`` (as Megatron-LM does), several under ``model0``, ``model1``, ...
RNG states are per (pipeline, tensor) rank and are restored only when that layout is unchanged.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_anchor.training import optimizer_state
from megatron_anchor.training.checkpoint_files import (  # noqa: F401 - the save folder's file names, public here too
    EXIT_RECORD_FILE,
    RUN_CONFIG_FILE,
    TRACKER_FILE,
    WEIGHTS_ONLY_KEY,
)
from megatron_anchor.training.config_io import ConfigError, dump_yaml, load_yaml

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where training stands: restored from a checkpoint, advanced by the loop."""

    iteration: int = 0
    consumed_train_samples: int = 0


def checkpoint_dir(root: str, iteration: int) -> str:
    """Directory of the checkpoint at ``iteration`` under ``root``."""
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """Iteration named by the tracker file under ``root``, or None when there is no finished checkpoint."""
    if not root:
        return None
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.exists(tracker):
        return None
    with open(tracker, encoding="utf-8") as fh:
        return int(fh.read().strip())


def _layout():
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "vp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    }


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state):
    """Per (pp, tp) rank RNG state; data- and context-parallel ranks hold replicas."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state",
        state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def model_keys(num_chunks: int) -> List[str]:
    """State-dict keys of the model chunks: ``model`` for one, ``model0``, ``model1``, ... for several."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _model_sharded_state_dict(model_chunks: List) -> dict:
    from megatron_anchor.training.model import unwrap

    return {key: unwrap(chunk).sharded_state_dict() for key, chunk in zip(model_keys(len(model_chunks)),
                                                                          model_chunks)}


def _models_only(sharded: dict):
    """The model chunks' part of a sharded state dict, as the optimizer expects it (one chunk: its own dict)."""
    keys = [k for k in sharded if k == "model" or (k.startswith("model") and k[5:].isdigit())]
    return sharded["model"] if keys == ["model"] else {k: sharded[k] for k in keys}


DISTOPT_FORMATS = ("dp_reshardable", "fully_reshardable")
"""megatron-core's distributed-optimizer checkpoint forms this trainer writes (Megatron-LM's two choices): per
bucket (parallel, no gathering; the same TP/PP/CP layout and gradient buckets on resume) or fully reshardable
(gathered at save, every rank's TP x PP shard in host memory unless memory-efficient; reshardable over TP/PP)."""


def optimizer_metadata(cfg) -> Optional[dict]:
    """The sharded-state-dict metadata of this run's optimizer (stored in every checkpoint as its content
    metadata, and read back from the checkpoint on load): None without the distributed optimizer (the plain
    optimizers' form needs none)."""
    if not cfg.parallel.use_distributed_optimizer:
        return None
    ck = cfg.checkpoint
    if not ck.dist_ckpt_optim_fully_reshardable:
        return {"distrib_optim_sharding_type": DISTOPT_FORMATS[0]}
    return {"distrib_optim_sharding_type": DISTOPT_FORMATS[1],
            "distrib_optim_fully_reshardable_mem_efficient": ck.distrib_optim_fully_reshardable_mem_efficient}


def save_checkpoint(root: str, state: TrainState, model_chunks: List, optimizer, scheduler,
                    fully_parallel: bool = False, run_config=None, tokenizer_record=None,
                    metadata: Optional[dict] = None) -> str:
    """Write a checkpoint of the current step under ``root`` and update the tracker file.

    With ``run_config`` (the run's :class:`AnchorConfig`), rank 0 also writes it as ``run_config.yaml`` beside the
    tracker, so generation and export can rebuild the model without repeating the training flags; with
    ``tokenizer_record`` it writes ``tokenizer_record.json`` there too, so they can check their tokenizer.
    ``metadata``: :func:`optimizer_metadata` of the run (kept in the checkpoint, so a load reads the optimizer
    state in the form it was written).
    """
    from megatron.core import dist_checkpointing

    ckpt = checkpoint_dir(root, state.iteration)
    if dist.get_rank() == 0:
        os.makedirs(ckpt, exist_ok=True)
    dist.barrier()
    sharded = _model_sharded_state_dict(model_chunks)
    optimizer_state.before_state_dict(optimizer)
    sharded["optimizer"] = optimizer.sharded_state_dict(_models_only(sharded), is_loading=False, metadata=metadata)
    sharded["opt_param_scheduler"] = scheduler.state_dict()
    sharded["rng_state"] = _rng_sharded_object(_rng_state())
    sharded["train_state"] = {"iteration": state.iteration,
                              "consumed_train_samples": state.consumed_train_samples}
    sharded["layout"] = _layout()
    strategy = None
    if fully_parallel:
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(), ps.get_data_parallel_group(with_context_parallel=True)
        )
    dist_checkpointing.save(sharded, ckpt, sharded_strategy=strategy, content_metadata=metadata)
    dist.barrier()
    if dist.get_rank() == 0:
        if run_config is not None:
            dump_yaml(run_config, os.path.join(root, RUN_CONFIG_FILE))
        if tokenizer_record is not None:
            from megatron_anchor.tokenizer.record import checkpoint_record_path, write_record

            write_record(checkpoint_record_path(root), tokenizer_record)
        from megatron_anchor.outputs import write_text
        from megatron_anchor.training.checkpoint_files import write_manifest

        write_manifest(ckpt)  # file sizes, checked before a load unpickles anything
        write_text(os.path.join(root, TRACKER_FILE), str(state.iteration))  # atomic: never a half-written tracker
    dist.barrier()
    return ckpt


def write_exit_record(root: str, iteration: int, reason: str) -> str:
    """Rank 0 records a clean early stop under ``root`` (:data:`EXIT_RECORD_FILE`, written atomically); returns its
    path."""
    import datetime

    from megatron_anchor.outputs import write_json

    path = os.path.join(root, EXIT_RECORD_FILE)
    if dist.get_rank() == 0:
        write_json(path, {"iteration": iteration, "reason": reason,
                          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return path


def load_checkpoint(root: str, model_chunks: List, optimizer, scheduler, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True, fully_parallel: bool = False) -> TrainState:
    """Restore from the latest checkpoint under ``root``; returns the position to continue from.

    With ``finetune`` only model weights are read and training starts at iteration 0. Without a finished
    checkpoint under ``root`` a fresh run starts (finetune then is an error: there is nothing to tune).
    ``fully_parallel``: each shard is read by one data-parallel rank and exchanged (megatron-core's fully parallel
    load) instead of by every replica.
    """
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        if finetune:
            raise FileNotFoundError(f"--finetune: no checkpoint under {root} ({TRACKER_FILE} missing)")
        if dist.get_rank() == 0:
            logger.warning("no checkpoint under %s: starting from scratch", root)
        return TrainState()
    ckpt = checkpoint_dir(root, iteration)
    saved_common = dist_checkpointing.load_common_state_dict(ckpt)
    saved_layout = saved_common.get("layout", {})
    layout = _layout()
    same_model_layout = all(saved_layout.get(k) == layout[k] for k in ("tp", "pp"))

    sharded = _model_sharded_state_dict(model_chunks)
    if not finetune and load_optim:
        optimizer_state.before_state_dict(optimizer)
        sharded["optimizer"] = optimizer.sharded_state_dict(
            _models_only(sharded), is_loading=True,
            metadata=dist_checkpointing.load_content_metadata(preloaded_state_dict=saved_common))
    restore_rng = not finetune and load_rng and same_model_layout
    if restore_rng:
        sharded["rng_state"] = _rng_sharded_object(_rng_state())
    strategy = None
    if fully_parallel:
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelLoadStrategyWrapper,
        )

        strategy = FullyParallelLoadStrategyWrapper(
            get_default_load_sharded_strategy(ckpt), ps.get_data_parallel_group(with_context_parallel=True))
    from megatron_anchor.training.checkpoint_files import describe_read_error, read_errors

    try:
        state = dist_checkpointing.load(sharded, ckpt, sharded_strategy=strategy)
    except read_errors() as exc:
        raise ConfigError(f"{ckpt}: the checkpoint cannot be read ({describe_read_error(exc)})") from None

    from megatron_anchor.training.model import unwrap

    for key, chunk in zip(model_keys(len(model_chunks)), model_chunks):
        unwrap(chunk).load_state_dict(state[key])
    if finetune or not load_optim:
        # bf16/fp16: the optimizer holds fp32 main copies of the weights, made when it was built (the random
        # init). Without its saved state they must be refreshed from the weights just loaded, or the first step
        # writes the random init back into the model (Megatron-LM does the same here); fp32: a no-op.
        optimizer.reload_model_params()
    if finetune:
        return TrainState()
    if load_optim:
        optimizer_state.before_load(state["optimizer"], optimizer)
        optimizer.load_state_dict(state["optimizer"])
        optimizer_state.after_load(optimizer)
        scheduler.load_state_dict(saved_common["opt_param_scheduler"])
    if restore_rng:
        _set_rng_state(state["rng_state"])
    elif load_rng and dist.get_rank() == 0:
        logger.warning("checkpoint layout %s differs from this run's %s: RNG state not restored",
                       saved_layout, layout)
    train_state = saved_common["train_state"]
    return TrainState(iteration=train_state["iteration"],
                      consumed_train_samples=train_state["consumed_train_samples"])


def _effective_architecture(model_cfg) -> dict:
    """Architecture fields with equivalent spellings made equal (no GQA = as many groups as heads, ...)."""
    from megatron_anchor.training.config import ARCHITECTURE_FIELDS

    arch = {name: getattr(model_cfg, name) for name in ARCHITECTURE_FIELDS}
    heads = arch["num_attention_heads"]
    arch["num_query_groups"] = arch["num_query_groups"] if arch.pop("group_query_attention") else heads
    if arch["kv_channels"] is None and heads:
        arch["kv_channels"] = model_cfg.hidden_size // heads
    if model_cfg.position_embedding_type == "learned_absolute":
        # The position table's size is part of the weights; RoPE settings are unused there.
        arch["max_position_embeddings"] = model_cfg.max_position_embeddings or model_cfg.seq_length
        del arch["rotary_base"], arch["rotary_percent"], arch["use_rope_scaling"]
    if not arch.get("use_rope_scaling"):
        arch.pop("rope_scaling_factor")
    return arch


def architecture_mismatches(saved_cfg, cfg) -> List[str]:
    """``field: checkpoint X, this run Y`` for every architecture field that differs (see ARCHITECTURE_FIELDS)."""
    saved, now = _effective_architecture(saved_cfg.model), _effective_architecture(cfg.model)
    return [f"--{name.replace('_', '-')}: checkpoint {saved.get(name)!r}, this run {now.get(name)!r}"
            for name in sorted(set(saved) | set(now)) if saved.get(name) != now.get(name)]


def _precision(cfg) -> str:
    t = cfg.training
    return "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"


def distopt_bucket_size(cfg, dp: int) -> Optional[int]:
    """The gradient-bucket size megatron-core's DDP uses for this run (its own rule: one bucket without the
    overlapped reduce, else ``max(40M, 1M x DP)`` elements): the per-bucket optimizer form depends on it."""
    if not cfg.parallel.overlap_grad_reduce:
        return None
    return max(40_000_000, 1_000_000 * dp)


def _grads_in_fp32(cfg) -> bool:
    return cfg.training.bf16 or cfg.parallel.accumulate_allreduce_grads_in_fp32


def optimizer_state_mismatches(saved_cfg, cfg, saved_format: Optional[str] = None, saved_dp: int = 1,
                               dp: int = 1) -> List[str]:
    """Why the optimizer state saved by ``saved_cfg``'s run cannot be loaded into ``cfg``'s (empty when it can).

    The state's form follows the optimizer: the distributed optimizer's shards or a plain optimizer's tensors,
    fp32 main copies beside bf16/fp16 weights or none. ``saved_format``: the checkpoint's distributed-optimizer form
    (its content metadata; None: megatron-core's reshardable default). The per-bucket form (``dp_reshardable``)
    holds each gradient bucket's slice as saved, so it fits only the same TP/PP/CP layout and virtual stages, the
    same gradient dtype and the same buckets (:func:`distopt_bucket_size`: the overlapped reduce and, past 40
    data-parallel ranks, DP itself)."""
    problems = []
    old_d, new_d = saved_cfg.parallel.use_distributed_optimizer, cfg.parallel.use_distributed_optimizer
    if old_d != new_d:
        problems.append(f"--use-distributed-optimizer: checkpoint {old_d}, this run {new_d}")
    if _precision(saved_cfg) != _precision(cfg):
        problems.append(f"precision: checkpoint {_precision(saved_cfg)}, this run {_precision(cfg)}")
    if not (old_d and new_d and saved_format == DISTOPT_FORMATS[0]):
        return problems
    hint = " (the distributed optimizer's state was saved per bucket; --dist-ckpt-optim-fully-reshardable saves it " \
           "reshardable)"
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "num_layers_per_virtual_pipeline_stage"):
        old, new = getattr(saved_cfg.parallel, name), getattr(cfg.parallel, name)
        if old != new:
            problems.append(f"--{name.replace('_', '-')}: checkpoint {old}, this run {new}{hint}")
    if _grads_in_fp32(saved_cfg) != _grads_in_fp32(cfg):
        problems.append(f"gradients reduced in fp32: checkpoint {_grads_in_fp32(saved_cfg)}, this run "
                        f"{_grads_in_fp32(cfg)}{hint}")
    old_b, new_b = distopt_bucket_size(saved_cfg, saved_dp), distopt_bucket_size(cfg, dp)
    if old_b != new_b:
        def buckets(n):
            return "one bucket" if n is None else f"{n:,}-element buckets"

        problems.append(f"gradient buckets: checkpoint {buckets(old_b)}, this run {buckets(new_b)} "
                        f"(--overlap-grad-reduce and, past 40 data-parallel ranks, the data-parallel size){hint}")
    return problems


def _saved_optimizer_form(root: str):
    """``(distributed-optimizer form, data-parallel size)`` of the latest checkpoint under ``root`` (its common
    state: the content metadata and the layout it was saved with), or ``(None, 1)`` when there is none."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        return None, 1
    common = dist_checkpointing.load_common_state_dict(checkpoint_dir(root, iteration))
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    return metadata.get("distrib_optim_sharding_type"), int(common.get("layout", {}).get("dp", 1))


def check_compatible(cfg, root: str, run_tokenizer_record: Optional[dict]) -> None:
    """Refuse ``--load``/``--finetune`` of a checkpoint trained with another architecture or tokenizer.

    Reads ``run_config.yaml`` and ``tokenizer_record.json`` from ``root`` (written at every save); a directory
    without them (no checkpoint yet, or one written by other tools) is not checked here. Raises
    :class:`~megatron_anchor.training.config_io.ConfigError` naming every field that differs.
    """
    from megatron_anchor.tokenizer.record import checkpoint_record_path, read_record, record_mismatches

    path = os.path.join(root, RUN_CONFIG_FILE)
    iteration = latest_iteration(root)
    if not cfg.checkpoint.finetune and iteration is not None:
        from megatron.core import dist_checkpointing

        if dist_checkpointing.load_common_state_dict(checkpoint_dir(root, iteration)).get(WEIGHTS_ONLY_KEY):
            raise ConfigError(f"{root} holds model weights only (an imported model, no optimizer state): start "
                              "from it with --finetune")
    problems = []
    if os.path.isfile(path):
        try:
            saved = load_yaml(path)
        except (ConfigError, OSError, ValueError) as exc:
            raise ConfigError(f"{path}: unreadable run configuration of the checkpoint ({exc})") from None
        problems += architecture_mismatches(saved, cfg)
        if not (cfg.checkpoint.finetune or cfg.checkpoint.no_load_optim):
            from megatron_anchor.training.initialize import world_size_from_env

            saved_format, saved_dp = _saved_optimizer_form(root)
            p = cfg.parallel
            dp = max(world_size_from_env() // max(p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                                  * p.context_parallel_size, 1), 1)
            problems += [f"optimizer state: {m}" for m in optimizer_state_mismatches(saved, cfg, saved_format,
                                                                                      saved_dp, dp)]
    try:
        saved_record = read_record(checkpoint_record_path(root))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if saved_record is not None and run_tokenizer_record is not None:
        problems += [f"tokenizer: {p}" for p in record_mismatches(saved_record, run_tokenizer_record)]
    if problems:
        verb = "fine-tune" if cfg.checkpoint.finetune else "resume"
        raise ConfigError(f"cannot {verb} from {root}: the checkpoint was trained with other settings "
                          f"({path}):\n    " + "\n    ".join(problems)
                          + "\n  pass the checkpoint's model and tokenizer flags (they are in that file); for "
                          "optimizer state, --no-load-optim (or --finetune) keeps the weights and starts a fresh "
                          "optimizer and LR schedule")
