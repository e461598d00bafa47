"""``AnchorGPTDataset``: megatron-core's ``GPTDataset`` plus the role channel.

The subclass reuses the parent's sample assembly unchanged (samples span documents, offsets, padding, the
extra label token). The low-level dataset it builds, :class:`RoleChannelIndexedDataset`, returns from ``get``
each token with its role packed above bit 32 of an int64, so the parent's slicing carries the roles along for
free. The subclass then unpacks them and returns ``roles`` aligned with ``labels``: ``roles[i]`` is the role of
the token predicted at position ``i``. Padding positions get role PAD.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_anchor.data.indexed import DatasetFormatError, check_role_channel, roles_prefix
from megatron_anchor.roles import Role

_ROLE_SHIFT = 32
_TOKEN_MASK = (1 << _ROLE_SHIFT) - 1


class RoleChannelIndexedDataset(IndexedDataset):
    """An ``IndexedDataset`` over the tokens that also holds the role channel.

    ``get(idx, offset, length)`` returns ``token | role << 32`` (int64); :meth:`get_tokens` and
    :meth:`get_roles` return the two channels separately.
    """

    def __new__(cls, path_prefix: Optional[str] = None, *args, **kwargs):
        # Validate before the parent's __init__ runs: a half-built IndexedDataset fails in its __del__.
        # (Unpickling calls __new__ without arguments.)
        if path_prefix is not None:
            check_role_channel(path_prefix, deep=False)
        return super().__new__(cls)

    def __init__(self, path_prefix: str, mmap: bool = True, **kwargs) -> None:
        super().__init__(path_prefix, multimodal=False, mmap=mmap, **kwargs)
        self.roles = IndexedDataset(roles_prefix(path_prefix), multimodal=False, mmap=mmap)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.roles = IndexedDataset(roles_prefix(self.path_prefix), multimodal=False, mmap=self.mmap)

    def get_tokens(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        return super().get(idx, offset=offset, length=length)

    def get_roles(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        return self.roles.get(idx, offset=offset, length=length)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        tokens = super().get(idx, offset=offset, length=length)
        roles = self.roles.get(idx, offset=offset, length=length)
        packed = roles.astype(np.int64)
        packed <<= _ROLE_SHIFT
        packed |= tokens
        return packed


def unpack_roles(packed: np.ndarray) -> tuple:
    """Split packed values into (tokens, roles). Entries without a role (< 2**32) are padding: role PAD."""
    has_role = packed > _TOKEN_MASK
    tokens = np.where(has_role, packed & _TOKEN_MASK, packed)
    roles = np.where(has_role, packed >> _ROLE_SHIFT, int(Role.PAD))
    return tokens, roles


class AnchorGPTDataset(GPTDataset):
    """``GPTDataset`` whose samples also carry ``roles`` (int64, aligned with ``labels``).

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
        # The parent assembles the sample from packed values; unpack here so it sees plain tokens after this.
        out = super()._query_document_sample_shuffle_indices(idx)
        tokens, self._last_roles = unpack_roles(out[0])
        return (tokens,) + tuple(out[1:])

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        roles = torch.from_numpy(self._last_roles)
        if self.config.add_extra_token_to_sequence:
            roles = roles[1:].contiguous()
        else:
            roles = torch.roll(roles, shifts=-1, dims=0)
            roles[-1] = int(Role.PAD)
        if idx is None:
            roles = torch.zeros_like(roles)
        sample["roles"] = roles
        return sample
