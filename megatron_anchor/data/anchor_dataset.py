"""``AnchorGPTDataset``: megatron-core's ``GPTDataset`` plus the role channel.

The subclass reuses the parent's sample assembly unchanged (samples span documents, offsets, padding, the
extra label token). Its low-level dataset, :class:`RoleChannelIndexedDataset`, notes each ``(document, offset,
length)`` the parent reads while it assembles a sample; the subclass then cuts the same slices out of the role
channel. So the roles follow exactly the slicing the parent used for the tokens, at the cost of one slice per
document piece. ``roles`` is returned aligned with ``labels``: ``roles[i]`` is the role of the token predicted
at position ``i``; padding gets role PAD.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_anchor.data.indexed import DatasetFormatError, bin_path, check_role_channel, roles_prefix
from megatron_anchor.roles import ROLE_DTYPE, Role


class RoleChannelIndexedDataset(IndexedDataset):
    """An ``IndexedDataset`` over the tokens that also holds the role channel.

    ``get`` behaves exactly like the parent's; between :meth:`start_recording` and :meth:`stop_recording` it
    also notes what it read, and :meth:`roles_for` returns the role slices of those reads.
    """

    def __new__(cls, path_prefix: Optional[str] = None, *args, **kwargs):
        # Validate before the parent's __init__ runs: a half-built IndexedDataset fails in its __del__.
        # (Unpickling calls __new__ without arguments.)
        if path_prefix is not None:
            check_role_channel(path_prefix, deep=False)
        return super().__new__(cls)

    def __init__(self, path_prefix: str, mmap: bool = True, **kwargs) -> None:
        super().__init__(path_prefix, multimodal=False, mmap=mmap, **kwargs)
        self._open_roles()

    def _open_roles(self) -> None:
        self._reads: List[Tuple[int, int, int]] = []
        self._record = None  # the bound append of ``_reads`` while recording (cheapest check in ``get``)
        path = bin_path(roles_prefix(self.path_prefix))
        # A plain ndarray over the map: slicing it is much cheaper than slicing an np.memmap.
        self._roles_map = np.memmap(path, ROLE_DTYPE, "r") if os.path.getsize(path) else None
        self._roles = np.asarray(self._roles_map) if self._roles_map is not None else np.zeros(0, ROLE_DTYPE)
        self._token_itemsize = np.dtype(self.index.dtype).itemsize

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._open_roles()

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        tokens = _parent_get(self, idx, offset, length)
        record = self._record
        if record is not None:
            record((idx, offset, len(tokens)))
        return tokens

    def get_roles(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Roles of sequence ``idx`` (the same slice ``get`` returns tokens for)."""
        start = int(self.index.sequence_pointers[idx]) // self._token_itemsize + offset
        if length is None:
            length = int(self.index.sequence_lengths[idx]) - offset
        return np.array(self._roles[start : start + length])

    def start_recording(self) -> None:
        self._reads = []
        self._record = self._reads.append

    def stop_recording(self) -> List[Tuple[int, int, int]]:
        self._record = None
        return self._reads

    def roles_for(self, reads: List[Tuple[int, int, int]], total: int) -> np.ndarray:
        """Roles (uint8) of the recorded reads, concatenated and padded with PAD up to ``total``."""
        pointers, roles, itemsize = self.index.sequence_pointers, self._roles, self._token_itemsize
        parts = []
        got = 0
        for idx, offset, n in reads:
            start = int(pointers[idx]) // itemsize + offset
            parts.append(roles[start : start + n])
            got += n
        if got < total:
            parts.append(np.zeros(total - got, dtype=ROLE_DTYPE))  # Role.PAD == 0
        # One concatenation of uint8 slices (roles stay uint8: 1/8 of the memory of int64 through collation).
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


_parent_get = IndexedDataset.get  # bound once: ``super()`` costs a lookup on every document piece


class AnchorGPTDataset(GPTDataset):
    """``GPTDataset`` whose samples also carry ``roles`` (uint8 role codes, aligned with ``labels``).

    Index a lookup table with ``roles.long()`` (a uint8 index tensor would be read as a boolean mask).

    Build it like ``GPTDataset``: ``BlendedMegatronDatasetBuilder(AnchorGPTDataset, sizes, is_built_on_rank,
    GPTDatasetConfig(...)).build()``. Each data path needs its role channel ``<prefix>_roles.{bin,idx}``;
    a missing or mismatched one fails at load with a message naming the files.
    """

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> IndexedDataset:
        try:
            return RoleChannelIndexedDataset(dataset_path, mmap=config.mmap_bin_files)
        except DatasetFormatError as e:
            raise DatasetFormatError(f"cannot use {dataset_path} as anchored training data: {e}") from None

    def _query_document_sample_shuffle_indices(self, idx: int):
        self.dataset.start_recording()
        try:
            out = super()._query_document_sample_shuffle_indices(idx)
        finally:
            reads = self.dataset.stop_recording()
        self._last_roles = self.dataset.roles_for(reads, len(out[0]))
        return out

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        roles = torch.from_numpy(self._last_roles)
        if self.config.add_extra_token_to_sequence:
            roles = roles[1:]
        else:
            roles = torch.roll(roles, shifts=-1, dims=0)
            roles[-1] = int(Role.PAD)
        if idx is None:
            roles = torch.zeros_like(roles)
        sample["roles"] = roles
        return sample
