"""Read a Hugging Face folder's tensors one at a time: safetensors (one file or an index of shards) or PyTorch
``.bin`` files, memory-mapped, so only the tensor being converted is ever materialised (as float32)."""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

from megatron_anchor.hf_import.families import ImportRefused

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some older folders save that carry no weights (RoPE frequencies are recomputed)."""


class HFWeights:
    """Lazy access to the tensors of ``folder``: :meth:`names` reads only file headers; :meth:`get` one tensor."""

    def __init__(self, folder: str):
        self.folder = folder
        self._where: Dict[str, str] = {}
        self._open: Dict[str, object] = {}
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if os.path.isfile(os.path.join(folder, index)):
                with open(os.path.join(folder, index), encoding="utf-8") as f:
                    self._where = dict(json.load(f)["weight_map"])
                break
            if os.path.isfile(os.path.join(folder, single)):
                self._where = {name: single for name in self._file_names(single)}
                break
        else:
            raise ImportRefused(f"{folder}: no model.safetensors, pytorch_model.bin or their .index.json")
        self._where = {k: v for k, v in self._where.items() if not k.endswith(IGNORED_SUFFIXES)}

    def _handle(self, file: str):
        if file not in self._open:
            path = os.path.join(self.folder, file)
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file] = safe_open(path, framework="pt")
            else:
                # mmap: tensors stay on disk until touched (needs the zip layout torch.save writes since 1.6).
                self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[file]

    def _file_names(self, file: str) -> List[str]:
        handle = self._handle(file)
        return list(handle.keys())

    def names(self) -> List[str]:
        """Every tensor name of the folder (buffers in :data:`IGNORED_SUFFIXES` left out)."""
        return sorted(self._where)

    def shape(self, name: str) -> List[int]:
        """The shape of ``name`` without reading its data."""
        handle = self._handle(self._where[name])
        if hasattr(handle, "get_slice"):
            return list(handle.get_slice(name).get_shape())
        return list(handle[name].shape)

    def get(self, name: str) -> torch.Tensor:
        """``name`` as a float32 tensor (a fresh copy; nothing else of the file is read)."""
        if name not in self._where:
            raise ImportRefused(f"{self.folder}: tensor {name} missing")
        handle = self._handle(self._where[name])
        t = handle.get_tensor(name) if hasattr(handle, "get_tensor") else handle[name]
        return t.to(torch.float32)
