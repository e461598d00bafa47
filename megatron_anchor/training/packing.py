"""Document boundaries inside a micro-batch, the megatron-core way (``--reset-attention-mask``).

A training sample of ``--seq-length`` tokens holds several documents (pretraining) or several whole SFT samples
(``tools/preprocess_sft.py --pack``), each ended by the end-of-document token. With ``--reset-attention-mask`` no
token may attend across such a boundary. Megatron's dataset can build a dense ``[s, s]`` mask for that, but
Transformer Engine's fused attention with a causal mask type ignores a dense mask: packed documents would then
attend to each other, silently, and the loss would look better than it is. So this module turns a micro-batch's
tokens into boundaries once, on the data path, and each layer implementation gets them in the form it honours:

- Transformer Engine: the micro-batch is flattened to one THD sequence (``[1, b*s]``) and
  :class:`~megatron.core.packed_seq_params.PackedSeqParams` (``qkv_format="thd"``, ``cu_seqlens``) selects
  variable-length attention, with RoPE applied per document.
- Local layers (CPU): :func:`block_causal_mask` builds the dense block-causal mask from the same boundaries;
  the local ``DotProductAttention`` applies a given mask as it is.

Boundaries sit after every end-of-document input token and at every sample's end, exactly where megatron-core's
``GPTDataset`` (``reset_attention_mask``) would cut its dense mask. Cost: one comparison pass over the
micro-batch's tokens on the host (O(b*s) time, O(documents) memory); the dense mask of the local path is
O(b*s^2) booleans, which is why the GPU path never builds it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

CU_SEQLENS = "cu_seqlens"
"""Batch key: int32 cumulative boundaries over the flattened micro-batch, ``[0, ..., b*s]``."""
MAX_SEQLEN = "max_seqlen"
"""Batch key: the longest segment (a Python int, so the GPU path needs no device-to-host copy)."""
CU_SEQLENS_PADDED = "cu_seqlens_padded"
"""Batch key (context parallelism with THD): cumulative boundaries after each document was padded to a multiple
of 2 x CP, over the padded (not the rank's partitioned) token stream."""
SAMPLE_LENGTH = "sample_length"
"""Batch key: tokens per sample (a Python int), so a pipeline stage without tokens can still build the mask."""
BOUNDARY_KEYS = (CU_SEQLENS, CU_SEQLENS_PADDED, MAX_SEQLEN, SAMPLE_LENGTH)
"""Every key that describes where documents begin and end: all pipeline stages' attention needs them."""


def boundaries(tokens: torch.Tensor, eod: int) -> Tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` for a ``[b, s]`` token batch: segments end after each ``eod`` and at every
    sample's end. ``cu_seqlens`` is int32 on the tokens' device, strictly increasing, from 0 to ``b*s``."""
    if tokens.dim() != 2:
        raise ValueError(f"expected [batch, seq] tokens, got shape {tuple(tokens.shape)}")
    b, s = tokens.shape
    flat = tokens.reshape(-1)
    ends = torch.nonzero(flat == eod, as_tuple=False).reshape(-1) + 1  # a document ends after its EOD
    sample_ends = torch.arange(1, b + 1, device=tokens.device) * s
    cuts = torch.cat([torch.zeros(1, dtype=ends.dtype, device=tokens.device), ends, sample_ends])
    cu = torch.unique(cuts)  # sorted; an EOD in a sample's last position coincides with the sample's end
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return cu.to(torch.int32), max_seqlen


def add_boundaries(batch: Dict[str, torch.Tensor], eod: int) -> Dict[str, torch.Tensor]:
    """Collated micro-batch plus ``cu_seqlens``, ``max_seqlen`` and ``sample_length`` (runs in the DataLoader,
    on the host)."""
    cu, longest = boundaries(batch["tokens"], eod)
    batch[CU_SEQLENS] = cu
    batch[MAX_SEQLEN] = longest
    batch[SAMPLE_LENGTH] = int(batch["tokens"].shape[1])
    return batch


def seqlen_squared_sum(cu_seqlens: torch.Tensor) -> int:
    """``sum L_i^2`` over the segments of a host ``cu_seqlens`` (the attention work the FLOPs count needs)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return int((lengths * lengths).sum())


def segment_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``[b, s]`` index of the segment each position belongs to (numbered over the whole micro-batch)."""
    positions = torch.arange(batch * seq, device=cu_seqlens.device)
    return (torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)).reshape(batch, seq)


def block_causal_mask(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``[b, 1, s, s]`` bool mask, True where attention is *not* allowed (megatron-core's convention): a query
    sees only earlier-or-equal positions of its own segment."""
    seg = segment_ids(cu_seqlens, batch, seq)  # [b, s]
    other_segment = seg.unsqueeze(2) != seg.unsqueeze(1)  # [b, s(query), s(key)]
    future = torch.ones(seq, seq, dtype=torch.bool, device=seg.device).triu(1)
    return (other_segment | future).unsqueeze(1)


def thd_params(cu_seqlens: torch.Tensor, max_seqlen: int, cu_seqlens_padded: Optional[torch.Tensor] = None):
    """megatron-core ``PackedSeqParams`` for THD (variable-length) attention over the flattened micro-batch.

    With context parallelism the padded boundaries serve as both the real and the padded ones, as in Megatron-LM:
    each document's padding follows its last real token, so under the causal mask no real token attends to it.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if cu_seqlens_padded is not None:
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens_padded, cu_seqlens_kv=cu_seqlens_padded,
                               cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
                               max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


# --- context parallelism: which tokens each CP rank holds -------------------------------------------------------

def zigzag_positions(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of a ``length``-token sequence that context-parallel rank ``cp_rank`` holds: the sequence is cut
    into ``2 x cp_size`` equal chunks and the rank keeps chunks ``cp_rank`` and ``2 cp_size - 1 - cp_rank``, so every
    rank gets the same share of causal attention work (Megatron-LM's and Transformer Engine's load balancing)."""
    if length % (2 * cp_size):
        raise ValueError(f"a sequence of {length} tokens cannot be split into 2 x {cp_size} equal chunks")
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def rank_token_multiple(tensor_parallel: int, sequence_parallel: bool, fp8: bool) -> int:
    """What each rank's token count per micro-batch must be a multiple of: TP with sequence parallelism (the
    sequence is split over the tensor-parallel ranks) and 16 with FP8 (Transformer Engine's FP8 GEMMs need the
    token dimension divisible by 16), 1 otherwise."""
    return math.lcm(tensor_parallel if sequence_parallel else 1, 16 if fp8 else 1)


def pad_documents(cu_seqlens: torch.Tensor, batch: int, seq: int, cp_size: int,
                  rank_multiple: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The padded THD layout for context parallelism: ``(cu_seqlens_padded, source)``.

    Every document is padded to a multiple of ``2 x cp_size``, and the last document of each sample further, so
    that all ``batch`` samples have the same padded length ``P``, with ``P / cp_size`` a multiple of
    ``rank_multiple`` (:func:`rank_token_multiple`: sequence parallelism and FP8 split or tile each rank's tokens).
    ``source[j]`` is the position in the flattened ``[batch * seq]`` micro-batch that padded position ``j`` holds
    (``-1`` for padding); ``cu_seqlens_padded`` (int32) bounds the padded documents over ``[batch * P]``. Host work
    O(b*s).
    """
    unit = 2 * cp_size
    cu = cu_seqlens.to(torch.int64).tolist()
    rows: List[List[Tuple[int, int, int]]] = [[] for _ in range(batch)]  # per sample: (start, length, padded)
    for start, end in zip(cu[:-1], cu[1:]):
        rows[start // seq].append((start, end - start, -(-(end - start) // unit) * unit))
    whole = cp_size * math.lcm(2, rank_multiple)
    padded = max(sum(p for _, _, p in docs) for docs in rows)
    padded = -(-padded // whole) * whole
    source = torch.full((batch * padded,), -1, dtype=torch.int64)
    bounds = [0]
    for docs in rows:
        extra = padded - sum(p for _, _, p in docs)
        for i, (start, n, p) in enumerate(docs):
            p += extra if i == len(docs) - 1 else 0
            at = bounds[-1]
            source[at:at + n] = torch.arange(start, start + n)
            bounds.append(at + p)
    return torch.tensor(bounds, dtype=torch.int32), source


def thd_partition_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of the padded THD stream that context-parallel rank ``cp_rank`` holds: :func:`zigzag_positions`
    of every document, in order (Transformer Engine's ``thd_get_partitioned_indices``, on the host)."""
    cu = cu_seqlens_padded.to(torch.int64).tolist()
    return torch.cat([start + zigzag_positions(end - start, cp_size, cp_rank) for start, end in zip(cu[:-1], cu[1:])])


def _per_token_keys(batch: Dict, b: int, s: int) -> List[str]:
    """Keys of tensors laid out per token (``[b, s, ...]``); per-sample ones (``[b]``, e.g. dataset_id) and the
    boundaries are not."""
    return [k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in BOUNDARY_KEYS
            and v.dim() >= 2 and tuple(v.shape[:2]) == (b, s)]


def split_for_context_parallel(batch: Dict, cp_size: int, cp_rank: int, mode: str, rank_multiple: int = 1) -> Dict:
    """This context-parallel rank's part of a host micro-batch (every per-token tensor, consistently).

    ``mode`` ``none``: each sample is split by :func:`zigzag_positions` (``[b, s] -> [b, s / cp]``).
    ``thd``: documents are padded (:func:`pad_documents`; tokens, labels, roles and loss mask are 0 there) and
    every document is split by :func:`zigzag_positions` (``[b, s] -> [b, P / cp]``), which is how Transformer
    Engine partitions THD input; ``cu_seqlens_padded`` and ``max_seqlen`` then describe the padded stream.
    Per-sample tensors (``dataset_id``) are kept whole. ``rank_multiple``: see :func:`pad_documents`. Host work
    O(b*s); the padding adds at most ``2 cp - 1`` tokens per document, plus what ``rank_multiple`` asks per sample.
    """
    if cp_size <= 1:
        return batch
    ref = batch["tokens"] if "tokens" in batch else batch["labels"]
    b, s = ref.shape[:2]
    keys = _per_token_keys(batch, b, s)
    out = dict(batch)
    if mode == "none":
        index = zigzag_positions(s, cp_size, cp_rank)
        for k in keys:
            out[k] = batch[k][:, index]
        return out
    if mode != "thd":
        raise ValueError(f"context parallelism needs Transformer Engine's attention (boundary mode {mode!r})")
    cu_padded, source = pad_documents(batch[CU_SEQLENS], b, s, cp_size, rank_multiple)
    picked = source[thd_partition_indices(cu_padded, cp_size, cp_rank)]  # flat positions, -1 for padding
    valid, safe = picked >= 0, picked.clamp(min=0)
    for k in keys:
        flat = batch[k].reshape(b * s, *batch[k].shape[2:])[safe]
        flat[~valid] = 0
        out[k] = flat.reshape(b, -1, *batch[k].shape[2:])
    out[CU_SEQLENS_PADDED] = cu_padded
    out[MAX_SEQLEN] = int((cu_padded[1:] - cu_padded[:-1]).max())
    return out
