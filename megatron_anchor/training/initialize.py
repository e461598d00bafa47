"""Process groups, parallel state and seeds."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_anchor import cpu_compat
from megatron_anchor.training.config import AnchorConfig


def world_size_from_env() -> int:
    """World size before init (torchrun's WORLD_SIZE), or the initialised group's size."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize_distributed(cfg: AnchorConfig) -> None:
    """Start torch.distributed (env:// from torchrun, or a single local process) and megatron's groups.

    Reuses an existing default process group (tests spawn their own). Activates the CPU workarounds when
    there is no GPU, before megatron builds any buffer.
    """
    from megatron.core import parallel_state

    p = cfg.parallel
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    cpu_compat.activate()
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=p.distributed_timeout_minutes)
        if "RANK" not in os.environ:
            # A plain `python pretrain_anchor.py`: a one-process group with an in-process store.
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            init_single_process_group(p.distributed_backend, timeout)
        else:
            dist.init_process_group(backend=p.distributed_backend, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    from megatron_anchor.training.model import num_model_chunks

    chunks = num_model_chunks(cfg)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=chunks if chunks > 1 else None,
        context_parallel_size=p.context_parallel_size,
    )


def check_distributed_optimizer_backend(cfg: AnchorConfig) -> None:
    """Refuse ``--use-distributed-optimizer`` on a gloo build without the collectives it needs.

    megatron-core's distributed optimizer reduce-scatters gradients into, and all-gathers parameters from, one
    flat buffer per bucket (``reduce_scatter_tensor`` / ``all_gather_into_tensor``). NCCL has both; gloo has them
    only in recent torch releases, so on gloo one tiny exchange over the data-parallel group tells, before any
    model is built. Raises :class:`~megatron_anchor.training.config_io.ConfigError`."""
    if not cfg.parallel.use_distributed_optimizer or dist.get_backend() != "gloo":
        return
    from megatron.core import parallel_state

    from megatron_anchor.training.config_io import ConfigError

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    n = dist.get_world_size(group)
    whole, part = torch.ones(n), torch.empty(1)
    try:
        dist.reduce_scatter_tensor(part, whole, group=group)
        dist.all_gather_into_tensor(whole, part, group=group)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise ConfigError(f"--use-distributed-optimizer: this torch's gloo backend (torch {torch.__version__}) has "
                          f"no reduce-scatter/all-gather into one tensor ({exc}); use NCCL, a newer torch, or drop "
                          "the flag") from None


def init_single_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """The default process group of a world of one, rendezvous through torch's in-process ``HashStore``.

    A ``tcp://`` or ``env://`` init method starts a ``TCPStore`` server, which listens on every interface whatever
    address the method names; a one-process run (generation, export, ``python pretrain_anchor.py``) has nobody to
    meet, so nothing of it should be reachable from the network."""
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def set_seeds(seed: int) -> None:
    """Seed python, numpy and torch per pipeline stage, and megatron's tensor-parallel RNG tracker.

    Tensor-parallel ranks share the CPU seed so that CPU initialisation builds the same full weight on each
    (each keeps its shard): TP=2 then starts from exactly the TP=1 weights.
    """
    from megatron.core import parallel_state

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    cpu_compat.seed_model_parallel_rng(stage_seed)


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shutdown() -> None:
    """Tear down megatron's groups and the default process group we may have created."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
