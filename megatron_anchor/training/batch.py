"""Micro-batches read once per tensor-parallel group and handed to each model chunk, as Megatron-LM does.

Every rank of a tensor-parallel (TP) group computes on the same samples, so only TP rank 0 reads and collates
them; it sends the other TP ranks exactly what their pipeline stage uses:

- the first stage: the embedding's inputs (``tokens``, ``position_ids``) and the document boundaries;
- the last stage: every other key (``labels``, ``loss_mask``, ``roles``, ``dataset_id``, ... whatever the
  dataset emits: the set is open) and the boundaries;
- a middle stage: only the boundaries (``cu_seqlens``, ``max_seqlen``, ...), and only when there are any
  (``--reset-attention-mask``); otherwise middle stages read nothing at all.

One broadcast of a fixed-size header (names, dtypes, shapes, Python scalars such as ``max_seqlen``, as JSON)
and one of a single byte buffer holding every tensor: two collectives and one host-to-device copy per
micro-batch, whatever keys the batch holds, variable-length ``cu_seqlens`` included. The header travels between
host memories over a gloo group beside the tensor-parallel group (:func:`host_group`), so receivers learn the
buffer's size without reading anything back from the device: on a GPU no rank's host waits for its device to
receive a micro-batch (the buffer's NCCL broadcast is ordered on the device stream, and the reader's copy to the
device is asynchronous from pinned memory). The tensors receivers get are views into the buffer.
With context parallelism the reading rank first keeps its CP rank's part of every per-token tensor
(:func:`~megatron_anchor.training.packing.split_for_context_parallel`).

With virtual pipeline stages each model chunk has its own iterator (megatron-core's interleaved schedule asks
chunk by chunk); they share one reader, so each micro-batch is read and broadcast once per rank and group.
Cost per micro-batch: O(bytes of the batch) host copy on the reader, no per-key collectives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_anchor.training.packing import BOUNDARY_KEYS, CU_SEQLENS, seqlen_squared_sum, \
    split_for_context_parallel

INPUT_KEYS = ("tokens", "position_ids")
"""Keys only the embedding (the first pipeline stage) reads."""
HEADER_BYTES = 16384
"""Size of the broadcast header; a batch whose description does not fit is refused with its keys named."""
_ALIGN = 16


def stage_keeps(first: bool, last: bool, boundaries: bool) -> Callable[[str], bool]:
    """Which batch keys a model chunk uses, given whether it is the first and/or last pipeline stage."""
    if first and last:
        return lambda key: True
    if first:
        return lambda key: key in INPUT_KEYS or key in BOUNDARY_KEYS
    if last:
        return lambda key: key not in INPUT_KEYS
    return lambda key: boundaries and key in BOUNDARY_KEYS


@dataclass
class DataPlan:
    """What this rank does with data: read it or receive it, and which keys each of its model chunks uses."""

    chunk_stages: List[Tuple[bool, bool]]
    """(is first pipeline stage, is last pipeline stage) per model chunk on this rank."""
    boundaries: bool
    """Whether batches carry document boundaries (every stage's attention then needs them)."""
    tp_rank: int = 0
    tp_size: int = 1
    tp_src: int = 0
    """Global rank of this TP group's rank 0 (the reader)."""
    tp_group: Optional[object] = None
    header_group: Optional[object] = None
    """Group over the same ranks as ``tp_group`` whose collectives run on host tensors (gloo): the headers."""
    cp_size: int = 1
    cp_rank: int = 0
    rank_multiple: int = 1
    """Each rank's tokens per micro-batch must be a multiple of this (THD + context parallelism pads to it)."""
    boundary_mode: str = "none"
    counts_attention: bool = False
    """Whether this rank adds its micro-batches' ``sum L^2`` to the step's FLOPs count (one rank per DP rank)."""
    keeps: List[Callable[[str], bool]] = field(init=False)

    def __post_init__(self):
        self.keeps = [stage_keeps(first, last, self.boundaries) for first, last in self.chunk_stages]

    def chunk_needs_data(self, i: int) -> bool:
        first, last = self.chunk_stages[i]
        return first or last or self.boundaries

    @property
    def needs_data(self) -> bool:
        return any(self.chunk_needs_data(i) for i in range(len(self.chunk_stages)))

    @property
    def reads(self) -> bool:
        """Whether this rank reads and collates samples (TP rank 0 of a stage that uses data)."""
        return self.needs_data and self.tp_rank == 0

    def keep(self, key: str) -> bool:
        """Whether any chunk on this rank uses ``key`` (what the reader broadcasts to this TP group)."""
        return any(keep(key) for keep in self.keeps)


def current_plan(num_chunks: int, boundary_mode: str, rank_multiple: int = 1) -> DataPlan:
    """The :class:`DataPlan` of this rank from megatron-core's parallel state (``rank_multiple``: see
    :func:`~megatron_anchor.training.packing.rank_token_multiple`)."""
    from megatron.core import parallel_state as ps

    stages = []
    for i in range(num_chunks):
        if num_chunks > 1:
            stages.append((ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
                           ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i)))
        else:
            stages.append((ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()))
    tp_rank = ps.get_tensor_model_parallel_rank()
    cp_rank = ps.get_context_parallel_rank()
    tp_group = ps.get_tensor_model_parallel_group()
    return DataPlan(chunk_stages=stages, boundaries=boundary_mode != "none", tp_rank=tp_rank,
                    tp_size=ps.get_tensor_model_parallel_world_size(),
                    tp_src=ps.get_tensor_model_parallel_src_rank(), tp_group=tp_group,
                    header_group=host_group(tp_group),
                    cp_size=ps.get_context_parallel_world_size(), cp_rank=cp_rank, rank_multiple=rank_multiple,
                    boundary_mode=boundary_mode,
                    counts_attention=tp_rank == 0 and cp_rank == 0 and ps.is_pipeline_first_stage())


_HOST_GROUPS: Dict[tuple, object] = {}


def host_group(group):
    """A gloo group over the ranks of ``group`` (itself when it already is gloo), for exchanges between host
    memories that must not wait on a device. Collective over all ranks (see :func:`gloo_twin`)."""
    if group is None or dist.get_world_size(group) == 1 or dist.get_backend(group) == "gloo":
        return group
    return gloo_twin(group)


def gloo_twin(group):
    """A new gloo group with the members of ``group``.

    Collective: every rank calls it with its own group of the same kind (e.g. all tensor-parallel groups), since
    gloo groups are made by all ranks together: one ``all_gather_object`` of each rank's group members, then one
    ``new_group`` per distinct member list, in the same order everywhere. Cached per default process group, so a
    process that builds several trainers makes them once. Cost: one small all-gather and O(world) group
    creations, once."""
    world = dist.group.WORLD
    mine = tuple(dist.get_process_group_ranks(group))
    key = (id(world), mine)
    if key not in _HOST_GROUPS:
        everyone: List[Optional[tuple]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        for ranks in sorted(set(everyone)):
            _HOST_GROUPS[(id(world), ranks)] = dist.new_group(list(ranks), backend="gloo")
        _HOST_GROUPS[("world", id(world))] = world  # keeps the id from being reused while the cache holds it
    return _HOST_GROUPS[key]


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a batch header")
    return value


def pack(batch: Dict, pin: bool = False) -> Tuple[dict, torch.Tensor]:
    """``(spec, buffer)``: every tensor of ``batch`` copied into one host byte buffer, the rest described in
    ``spec`` (a JSON-able dict: tensors as dtype/shape/offset, Python scalars as values)."""
    tensors, scalars, offset = {}, {}, 0
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.contiguous()
            nbytes = value.numel() * value.element_size()
            tensors[key] = (str(value.dtype), list(value.shape), offset, nbytes, value)
            offset += -(-nbytes // _ALIGN) * _ALIGN
        elif value is None or isinstance(value, (bool, int, float, str)):
            scalars[key] = value
        else:
            raise TypeError(f"batch key {key!r} holds a {type(value).__name__}: only tensors and Python scalars can "
                            "be sent to the other tensor-parallel ranks")
    buffer = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
    for dtype, shape, at, nbytes, value in tensors.values():
        if nbytes:
            buffer[at:at + nbytes].copy_(value.cpu().reshape(-1).view(torch.uint8))
    spec = {"tensors": {k: v[:4] for k, v in tensors.items()}, "scalars": scalars, "size": offset}
    return spec, buffer


def unpack(spec: dict, buffer: torch.Tensor) -> Dict:
    """The batch :func:`pack` described, as views into ``buffer`` (on whatever device it now is)."""
    out = dict(spec["scalars"])
    for key, (dtype, shape, at, nbytes) in spec["tensors"].items():
        dt = _dtype(dtype)
        out[key] = buffer[at:at + nbytes].view(dt).reshape(shape) if nbytes else torch.empty(shape, dtype=dt,
                                                                                          device=buffer.device)
    return out


def encode_header(spec: dict) -> torch.Tensor:
    """``spec`` as a fixed-size host uint8 tensor (length-prefixed JSON)."""
    raw = json.dumps(spec, separators=(",", ":")).encode()
    if len(raw) + 8 > HEADER_BYTES:
        raise ValueError(f"the batch description ({len(raw)} bytes; keys {sorted(spec['tensors'])} "
                         f"{sorted(spec['scalars'])}) does not fit the {HEADER_BYTES}-byte broadcast header")
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    header[:8] = torch.tensor(list(len(raw).to_bytes(8, "little")), dtype=torch.uint8)
    header[8:8 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return header


def decode_header(header: torch.Tensor) -> dict:
    """Inverse of :func:`encode_header` (a host tensor)."""
    data = header.numpy().tobytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n].decode())


class MicroBatchSource:
    """This rank's stream of micro-batches on ``device``: read (TP rank 0) or received (other TP ranks).

    ``attention_squares`` accumulates ``sum L^2`` of the document lengths read since the loop last reset it
    (only where ``plan.counts_attention``), for the step's FLOPs.
    """

    def __init__(self, loader: Optional[Iterator], plan: DataPlan, device: torch.device):
        if plan.reads and loader is None:
            raise ValueError("this rank reads the data for its tensor-parallel group but got no data iterator")
        self.loader = loader
        self.plan = plan
        self.device = device
        self.pin = device.type == "cuda"
        self.attention_squares = 0

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        plan = self.plan
        if plan.reads:
            batch = next(self.loader)
            if plan.counts_attention and CU_SEQLENS in batch:
                self.attention_squares += seqlen_squared_sum(batch[CU_SEQLENS])
            batch = split_for_context_parallel(batch, plan.cp_size, plan.cp_rank, plan.boundary_mode,
                                               plan.rank_multiple)
            batch = {k: v for k, v in batch.items() if plan.keep(k)}
            spec, host = pack(batch, pin=self.pin)
            buffer = host.to(self.device, non_blocking=True)
            if plan.tp_size > 1:
                dist.broadcast(encode_header(spec), plan.tp_src, group=plan.header_group)
                dist.broadcast(buffer, plan.tp_src, group=plan.tp_group)
            return unpack(spec, buffer)
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        dist.broadcast(header, plan.tp_src, group=plan.header_group)
        spec = decode_header(header)
        buffer = torch.empty(spec["size"], dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, plan.tp_src, group=plan.tp_group)
        return unpack(spec, buffer)


class _ChunkIterator:
    """One model chunk's view of a shared :class:`MicroBatchSource`: micro-batch ``i`` of every chunk is the
    same micro-batch, fetched once and kept until every chunk that uses data has taken it."""

    def __init__(self, shared: "_Shared", keep: Callable[[str], bool]):
        self.shared = shared
        self.keep = keep
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        batch = self.shared.get(self.index)
        self.index += 1
        return {k: v for k, v in batch.items() if self.keep(k)}


class _Shared:
    def __init__(self, source: MicroBatchSource, consumers: int):
        self.source = source
        self.consumers = consumers
        self.pending: Dict[int, list] = {}
        self.fetched = 0

    def get(self, index: int) -> Dict:
        while self.fetched <= index:
            self.pending[self.fetched] = [next(self.source), self.consumers]
            self.fetched += 1
        entry = self.pending[index]
        entry[1] -= 1
        if entry[1] == 0:
            del self.pending[index]
        return entry[0]


def distribute(loader: Optional[Iterator], plan: DataPlan, device: torch.device):
    """Per-chunk iterators for the schedule: a single iterator (or None) with one model chunk, else a list with
    one entry per chunk (None for chunks that use no data). Also returns the :class:`MicroBatchSource` (None when
    this rank uses no data), whose ``attention_squares`` the loop reads."""
    if not plan.needs_data:
        iterators = [None] * len(plan.chunk_stages)
        return (iterators if len(iterators) > 1 else None), None
    source = MicroBatchSource(loader if plan.reads else None, plan, device)
    if len(plan.chunk_stages) == 1:
        return source, source
    users = [i for i in range(len(plan.chunk_stages)) if plan.chunk_needs_data(i)]
    shared = _Shared(source, len(users))
    return [(_ChunkIterator(shared, plan.keeps[i]) if i in users else None)
            for i in range(len(plan.chunk_stages))], source
