"""Deterministic sharding of a JSONL input by byte range, shared by the data tools.

Shard ``i`` of ``n`` owns the lines that *start* in bytes ``[i*size//n, (i+1)*size//n)``. The rule depends only on
the input's size, so shard outputs are reproducible, and the shards, concatenated in order, hold every line exactly
once, in input order. Line numbers stay those of the whole file, for error messages.
"""

from __future__ import annotations

import os
from typing import BinaryIO, Tuple


def shard_byte_range(size: int, num_shards: int, shard_index: int) -> Tuple[int, int]:
    """``(start, end)`` byte offsets whose line starts belong to shard ``shard_index``."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index must be in [0, {num_shards}); got {shard_index}")
    return size * shard_index // num_shards, size * (shard_index + 1) // num_shards


def count_newlines(f: BinaryIO, end: int) -> int:
    """Newlines in the first ``end`` bytes of ``f`` (read in blocks; leaves the position undefined)."""
    f.seek(0)
    n, left = 0, end
    while left > 0:
        block = f.read(min(left, 1 << 24))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
    return n


def seek_to_shard(f: BinaryIO, start: int) -> int:
    """Position ``f`` at the first line starting at or after ``start``; return how many lines come before it."""
    if start <= 0:
        f.seek(0)
        return 0
    lines = count_newlines(f, start)
    f.seek(start - 1)
    # A line starting exactly at ``start`` follows a newline; anything else belongs to the previous shard.
    if f.read(1) != b"\n":
        f.readline()
        lines += 1
    return lines


def shard_path(path: str, num_shards: int, shard_index: int) -> str:
    """A shard's output name: ``out.jsonl`` -> ``out.shard00001-of-00004.jsonl`` (the extension kept last)."""
    root, ext = os.path.splitext(path)
    return f"{root}.shard{shard_index:05d}-of-{num_shards:05d}{ext}"
