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

from typing import Dict, Tuple

import torch

CU_SEQLENS = "cu_seqlens"
"""Batch key: int32 cumulative boundaries over the flattened micro-batch, ``[0, ..., b*s]``."""
MAX_SEQLEN = "max_seqlen"
"""Batch key: the longest segment (a Python int, so the GPU path needs no device-to-host copy)."""


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
    """Collated micro-batch plus ``cu_seqlens`` and ``max_seqlen`` (runs in the DataLoader, on the host)."""
    cu, longest = boundaries(batch["tokens"], eod)
    batch[CU_SEQLENS] = cu
    batch[MAX_SEQLEN] = longest
    return batch


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


def thd_params(cu_seqlens: torch.Tensor, max_seqlen: int):
    """megatron-core ``PackedSeqParams`` for THD (variable-length) attention over the flattened micro-batch."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
