"""Cutting a preprocessing input into parts: the unit of parallel work and of resumption.

A part is ``docs_per_part`` physical lines of this run's shard. An ordinary file is only scanned for line ends
(in blocks of a few MiB, so memory stays flat whatever the file's size) and its parts are :class:`LineRange` s that
workers read themselves; a ``.gz`` input is streamed and its parts carry their lines (one part in memory at a
time). Time is linear in the input's size.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, Tuple, Union

from megatron_anchor.annotation.schema import DocumentError
from megatron_anchor.sharding import seek_to_shard, shard_byte_range

if TYPE_CHECKING:  # only annotations
    from megatron_anchor.data.convert import PreprocessConfig


@dataclass(frozen=True)
class LineRange:
    """A part of an uncompressed input, by position: the lines in bytes ``[start, stop)``, the first of which is
    line ``first_line`` of the file. Workers read their part's bytes themselves, so the driver only
    finds the boundaries and never copies the corpus through the pool's pipes."""

    path: str
    start: int
    stop: int
    first_line: int

    def head(self, nbytes: int) -> "LineRange":
        """The first lines of this range that hold at least ``nbytes`` bytes (all of it when it is shorter)."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(min(self.stop - self.start, nbytes))
            if len(data) < self.stop - self.start and not data.endswith(b"\n"):
                data += f.readline()  # the line crossing nbytes, whole (it ends at or before stop)
        return LineRange(self.path, self.start, self.start + len(data), self.first_line)

    def lines(self) -> List[Tuple[int, bytes]]:
        """``[(line_no, line), ...]`` of the non-blank lines, each with its newline (as iterating a file gives)."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.stop - self.start)
        pieces = data.split(b"\n")
        tail = pieces.pop()  # what follows the last newline: empty unless the file ends without one
        out = [(n, p + b"\n") for n, p in enumerate(pieces, self.first_line) if p.strip()]
        if tail.strip():
            out.append((self.first_line + len(pieces), tail))
        return out


_SCAN_BLOCK = 1 << 22

PartLines = Union[List[Tuple[int, bytes]], LineRange]
"""A part's input: its lines, or (uncompressed input) where to read them."""


def part_lines(src: PartLines) -> List[Tuple[int, bytes]]:
    """The ``(line_no, line)`` pairs of a part, reading them when the part is given by position."""
    return src.lines() if isinstance(src, LineRange) else src


def iter_parts(cfg: PreprocessConfig) -> Iterator[Tuple[int, int, PartLines]]:
    """Yield ``(part, bytes_read_so_far, lines)`` for this run's shard of the input.

    A part is ``docs_per_part`` physical lines. Blank lines are skipped but counted (line numbers stay those of
    the file, for error messages). Compressed input is streamed and its parts carry their lines; an ordinary
    file is only scanned for line ends here, and its parts are :class:`LineRange` s.
    """
    if cfg.input.endswith(".gz"):
        yield from _iter_gz_parts(cfg)
        return
    size = os.path.getsize(cfg.input)
    with open(cfg.input, "rb") as f:
        start, end, line_no = 0, size, 0
        if cfg.num_shards > 1:
            start, end = shard_byte_range(size, cfg.num_shards, cfg.shard_index)
            line_no = seek_to_shard(f, start)
            start = f.tell()
        if start >= min(end, size):
            return
        # Find line ends block by block (not through mmap: mapped pages would count as this process's memory).
        part, part_start, seen, pos = 0, start, 0, start
        block, block_start, off = f.read(_SCAN_BLOCK), start, 0
        while pos < end and pos < size:  # a line belongs here when it starts before ``end``
            nl = block.find(b"\n", off)
            if nl >= 0:
                pos, off = block_start + nl + 1, nl + 1
            else:
                block_start += len(block)
                block, off = f.read(_SCAN_BLOCK), 0
                if block:
                    continue
                pos = size  # the last line has no newline
            seen += 1
            if seen % cfg.docs_per_part == 0:
                yield part, pos - start, LineRange(cfg.input, part_start, pos, line_no + 1)
                part, part_start, line_no = part + 1, pos, line_no + cfg.docs_per_part
        if seen % cfg.docs_per_part:
            yield part, pos - start, LineRange(cfg.input, part_start, pos, line_no + 1)


def _iter_gz_parts(cfg: PreprocessConfig) -> Iterator[Tuple[int, int, PartLines]]:
    with gzip.open(cfg.input, "rb") as f:
        line_no = 0
        part, lines, seen, nbytes = 0, [], 0, 0
        for line in _gz_lines(f, cfg.input):
            line_no += 1
            seen += 1
            nbytes += len(line)
            if line.strip():
                lines.append((line_no, line))
            if seen % cfg.docs_per_part == 0:
                yield part, nbytes, lines
                part, lines = part + 1, []
        if lines or seen % cfg.docs_per_part:
            yield part, nbytes, lines


def _gz_lines(f, path: str) -> Iterator[bytes]:
    """The lines of an open gzip file; a truncated or corrupt stream is a :class:`DocumentError` naming the file
    and the line where the damage starts (finished parts stay: a fixed file resumes the run)."""
    import zlib

    line_no = 0
    while True:
        try:
            line = f.readline()
        except (EOFError, OSError, zlib.error) as exc:
            raise DocumentError(f"{path}:{line_no + 1}",
                                f"the compressed input is truncated or corrupt ({exc})") from None
        if not line:
            return
        line_no += 1
        yield line
