"""``AnchorGPTDataset``: megatron-core's ``GPTDataset`` plus the role channel.

The subclass reuses the parent's sample assembly unchanged (samples span documents, offsets, padding, the
extra label token). Its low-level dataset, :class:`RoleChannelIndexedDataset`, wraps the parent's token reader:
while the parent assembles a sample, every token read also cuts the role slice at the same position, and the
subclass joins those slices. So the roles follow exactly the slicing the parent used for the tokens, at the
cost of one slice per document piece. ``roles`` is returned aligned with ``labels``: ``roles[i]`` is the role of the token predicted
at position ``i``; padding gets role PAD.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_anchor.data.indexed import DatasetFormatError, bin_path, check_role_channel, roles_prefix
from megatron_anchor.roles import ROLE_DTYPE


class _RoleRecordingReader:
    """Wraps the parent's token reader: while recording, each token read also cuts the role slice at the same
    position (the role channel has the token file's layout, one byte per token)."""

    __slots__ = ("inner", "roles", "itemsize", "parts")

    def __init__(self, inner, roles: np.ndarray, itemsize: int) -> None:
        self.inner = inner
        self.roles = memoryview(roles)  # slicing a memoryview is cheaper than slicing an ndarray
        self.itemsize = itemsize
        self.parts: Optional[List[memoryview]] = None

    def read(self, dtype, count, offset):
        parts = self.parts
        if parts is not None:
            start = offset // self.itemsize
            parts.append(self.roles[start : start + count])
        return self.inner.read(dtype=dtype, count=count, offset=offset)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class RoleChannelIndexedDataset(IndexedDataset):
    """An ``IndexedDataset`` over the tokens that also holds the role channel.

    ``get`` is the parent's; between :meth:`start_recording` and :meth:`stop_recording` every token read also
    keeps the role slice at the same position, and :meth:`roles_for` joins them.
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
        path = bin_path(roles_prefix(self.path_prefix))
        # A plain ndarray over the map: slicing it is much cheaper than slicing an np.memmap.
        self._roles_map = np.memmap(path, ROLE_DTYPE, "r") if os.path.getsize(path) else None
        self._roles = np.asarray(self._roles_map) if self._roles_map is not None else np.zeros(0, ROLE_DTYPE)
        self._token_itemsize = np.dtype(self.index.dtype).itemsize
        self.bin_reader = _RoleRecordingReader(self.bin_reader, self._roles, self._token_itemsize)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._open_roles()

    def get_roles(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Roles of sequence ``idx`` (the same slice ``get`` returns tokens for)."""
        start = int(self.index.sequence_pointers[idx]) // self._token_itemsize + offset
        if length is None:
            length = int(self.index.sequence_lengths[idx]) - offset
        return np.array(self._roles[start : start + length])

    def start_recording(self) -> None:
        self.bin_reader.parts = []

    def stop_recording(self) -> List[memoryview]:
        parts, self.bin_reader.parts = self.bin_reader.parts, None
        return parts

    @staticmethod
    def roles_for(parts: List[memoryview], tokens: np.ndarray, pad_id: Optional[int], total: int,
                  skip: int = 0) -> np.ndarray:
        """The recorded role slices (uint8) joined and padded with PAD up to ``total``, without their first
        ``skip`` entries. Roles stay uint8 (1/8 of the memory of int64 through collation).

        Tripwire: the recorded slices must cover the sample's real ``tokens`` (all but the pad ids megatron
        appends to a short sample). If a megatron-core release reads tokens by another path than
        ``bin_reader.read``, fewer roles are recorded, and padding them with PAD would silently drop loss; this
        raises instead.
        """
        buf = bytearray().join(parts)  # one copy, and a writable buffer (cheaper than np.concatenate)
        trailing_pad = _trailing_run(tokens, pad_id)
        if not len(tokens) - trailing_pad <= len(buf) <= len(tokens):
            tokens_read = len(tokens) - trailing_pad
            raise RuntimeError(
                f"role channel out of step with the tokens: recorded {len(buf)} roles for {tokens_read} tokens "
                "read; megatron-core's GPTDataset no longer reads tokens through IndexedDataset.bin_reader.read "
                "(this megatron-core version is not supported by AnchorGPTDataset)")
        if len(buf) < total:
            buf.extend(bytes(total - len(buf)))  # Role.PAD == 0
        return np.frombuffer(buf, ROLE_DTYPE, offset=skip)


def _trailing_run(tokens: np.ndarray, value: Optional[int]) -> int:
    """Length of the run of ``value`` at the end of ``tokens`` (0 when ``value`` is None)."""
    if value is None or len(tokens) == 0 or tokens[-1] != value:
        return 0
    other = np.flatnonzero(tokens != value)
    return len(tokens) - (int(other[-1]) + 1 if len(other) else 0)


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
        # out[0]: the sample's tokens, real ones first and megatron's padding (its pad id) after them.
        pad = getattr(self, "_pad_token_id", None)
        if self.config.add_extra_token_to_sequence:  # roles[i]: the role of label i, i.e. of token i + 1
            self._last_roles = self.dataset.roles_for(reads, out[0], pad, len(out[0]), skip=1)
        else:  # the labels are the tokens shifted by one, the last one padding
            self._last_roles = self.dataset.roles_for(reads, out[0], pad, len(out[0]) + 1, skip=1)
        return out

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        roles = torch.from_numpy(self._last_roles)
        if idx is None:
            roles = torch.zeros_like(roles)
        if roles.shape != sample["labels"].shape:  # tripwire: the parent changed how it shapes a sample
            raise RuntimeError(f"roles {tuple(roles.shape)} do not align with labels {tuple(sample['labels'].shape)}"
                               "; this megatron-core version is not supported by AnchorGPTDataset")
        sample["roles"] = roles
        return sample
