"""Megatron indexed mmap datasets (``.bin``/``.idx``) with a sibling role channel.

The format is megatron-core's ``IndexedDataset`` (non-multimodal)::

    .idx: b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 sequence count | u64 len(document_indices)
          | int32 sequence_lengths[S] | int64 byte pointers[S] | int64 document_indices[D+1] (starts at 0)
    .bin: the tokens of all sequences, back to back

Every document here is one sequence. The role channel ``<prefix>_roles`` is the same format with dtype uint8
and exactly the same sequence lengths and document indices. Writers here emit megatron-core's bytes exactly
(the tests compare against ``IndexedDatasetBuilder``) but buffer whole parts, stream merges without holding
any index in memory, and only ever write under temporary names that are renamed when complete.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

import numpy as np

from megatron_anchor.roles import KNOWN_ROLE_CODES, ROLE_DTYPE

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8,
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
ROLES_SUFFIX = "_roles"
TMP_SUFFIX = ".tmp"
_COPY_CHUNK = 16 << 20


def roles_prefix(prefix: str) -> str:
    """Path prefix of the role channel for a token dataset prefix."""
    return prefix + ROLES_SUFFIX


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


class DatasetFormatError(ValueError):
    """An indexed dataset that is missing, truncated or inconsistent (the message names the file)."""


@dataclass
class IndexHeader:
    """The fixed-size head of an ``.idx`` file and where its arrays lie."""

    path: str
    dtype: type
    sequence_count: int
    document_count: int  # number of documents (len(document_indices) - 1)

    @property
    def arrays_offset(self) -> int:
        return _HEADER.size

    def expected_idx_size(self) -> int:
        return _HEADER.size + self.sequence_count * (4 + 8) + (self.document_count + 1) * 8


def read_index_header(path: str) -> IndexHeader:
    """Read and check an ``.idx`` header, including that the file is as long as its header says."""
    if not os.path.isfile(path):
        raise DatasetFormatError(f"{path}: index file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise DatasetFormatError(f"{path}: truncated index header ({size} bytes)")
    magic, version, code, seq_count, doc_idx_count = _HEADER.unpack(head)
    if magic != INDEX_MAGIC:
        raise DatasetFormatError(f"{path}: not a Megatron indexed dataset (bad magic {magic!r})")
    if version != INDEX_VERSION:
        raise DatasetFormatError(f"{path}: unsupported index version {version}")
    if code not in CODE_DTYPES:
        raise DatasetFormatError(f"{path}: unknown dtype code {code}")
    if doc_idx_count < 1:
        raise DatasetFormatError(f"{path}: document index is empty")
    header = IndexHeader(path, CODE_DTYPES[code], seq_count, doc_idx_count - 1)
    if size != header.expected_idx_size():
        raise DatasetFormatError(
            f"{path}: index is {size} bytes but its header describes {header.expected_idx_size()} "
            "(truncated or corrupt file)"
        )
    return header


def read_index_arrays(path: str) -> Tuple[IndexHeader, np.ndarray, np.ndarray, np.ndarray]:
    """Header, sequence lengths (int32), byte pointers (int64) and document indices (int64), memory-mapped."""
    h = read_index_header(path)
    raw = np.memmap(path, np.uint8, "r")
    off = h.arrays_offset
    n = h.sequence_count
    lengths = raw[off : off + 4 * n].view(np.int32)
    off += 4 * n
    pointers = raw[off : off + 8 * n].view(np.int64)
    off += 8 * n
    doc_idx = raw[off : off + 8 * (h.document_count + 1)].view(np.int64)
    return h, lengths, pointers, doc_idx


def _write_index(f, dtype: type, lengths: np.ndarray, doc_indices: np.ndarray) -> None:
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, DTYPE_CODES[dtype], len(lengths), len(doc_indices)))
    f.write(np.asarray(lengths, dtype=np.int32).tobytes())
    f.write(pointers.tobytes())
    f.write(np.asarray(doc_indices, dtype=np.int64).tobytes())


def publish(tmp_prefix: str, final_prefix: str) -> None:
    """Rename ``tmp_prefix.{bin,idx}`` to ``final_prefix.{bin,idx}``: ``.idx`` last, so a reader never sees a
    complete-looking index beside a half-renamed ``.bin``."""
    os.replace(bin_path(tmp_prefix), bin_path(final_prefix))
    os.replace(idx_path(tmp_prefix), idx_path(final_prefix))


def write_documents(prefix: str, docs: Sequence[np.ndarray], dtype: type) -> None:
    """Write documents (one sequence each) as ``prefix.{bin,idx}``, via temporary names."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    write_flat(prefix, np.concatenate(docs) if len(docs) else np.zeros(0, dtype), lengths, dtype)


def write_flat(prefix: str, data: np.ndarray, lengths: np.ndarray, dtype: type) -> None:
    """Write documents given as one flat array and their lengths as ``prefix.{bin,idx}``, via temporary names.

    One write per file: the cost is a copy of the part's tokens, whatever the number of documents."""
    tmp = prefix + TMP_SUFFIX
    with open(bin_path(tmp), "wb") as f:
        np.ascontiguousarray(data, dtype=dtype).tofile(f)
    with open(idx_path(tmp), "wb") as f:
        _write_index(f, dtype, np.asarray(lengths), np.arange(len(lengths) + 1, dtype=np.int64))
    publish(tmp, prefix)


def write_token_role_part(prefix: str, ids: np.ndarray, roles: np.ndarray, lengths: np.ndarray,
                          dtype: type) -> None:
    """Write flat ids and roles (documents of ``lengths`` tokens) as the token dataset ``prefix`` and its role
    channel, the channel published first (so an existing token dataset always has its matching channel)."""
    if len(ids) != len(roles) or len(ids) != int(np.asarray(lengths, dtype=np.int64).sum()):
        raise ValueError(f"{len(ids)} tokens, {len(roles)} roles and document lengths summing to "
                         f"{int(np.asarray(lengths, dtype=np.int64).sum())} must agree")
    write_flat(roles_prefix(prefix), roles, lengths, ROLE_DTYPE)
    write_flat(prefix, ids, lengths, dtype)


def write_token_role_documents(prefix: str, docs: Sequence[Tuple[np.ndarray, np.ndarray]], dtype: type) -> None:
    """Write ``(ids, roles)`` documents as the token dataset ``prefix`` and its role channel.

    The role channel is published first, so an existing token dataset always has its matching channel.
    """
    for ids, roles in docs:
        if len(ids) != len(roles):
            raise ValueError(f"a document has {len(ids)} tokens but {len(roles)} roles")
    lengths = np.fromiter((len(i) for i, _ in docs), np.int64, len(docs))
    ids = np.concatenate([i for i, _ in docs]) if docs else np.zeros(0, dtype)
    roles = np.concatenate([r for _, r in docs]) if docs else np.zeros(0, ROLE_DTYPE)
    write_token_role_part(prefix, ids, roles, lengths, dtype)


def append_file(src_path: str, dst) -> None:
    """Append the file at ``src_path`` to ``dst`` (a file opened unbuffered, ``buffering=0``): in the kernel with
    ``copy_file_range`` where the platform and file system allow it (no copy through user space), else by blocks
    of ``_COPY_CHUNK`` bytes. Time is linear in the file's size, memory constant."""
    with open(src_path, "rb", buffering=0) as src:
        copied = 0
        if hasattr(os, "copy_file_range"):
            try:
                while True:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), _COPY_CHUNK)
                    if n == 0:
                        return
                    copied += n
            except OSError:  # e.g. EXDEV/EINVAL on older kernels or some file systems: the portable copy
                if copied:
                    raise
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


class DatasetMerger:
    """Concatenates indexed datasets (same dtype) into ``out_prefix`` in the order they are added, as they become
    available: :meth:`add` appends a dataset's ``.bin`` to the temporary output at once (so a producer of parts
    can merge while it still writes later ones), :meth:`finish` writes the index and renames both files into
    place; :meth:`abort` removes the temporary files.

    Index arrays are read back part by part at :meth:`finish` (pointers rebased on the fly) and ``.bin`` files are
    block-copied, so memory stays flat whatever the total size: one header per added dataset. Time is linear in
    the bytes merged.
    """

    def __init__(self, out_prefix: str):
        self.out_prefix = out_prefix
        self._tmp = out_prefix + TMP_SUFFIX
        self._prefixes: List[str] = []
        self._headers: List[IndexHeader] = []
        self._dtype = None
        self._bin = None

    def check(self, prefix: str) -> IndexHeader:
        """The header of a dataset that :meth:`add` would take (same dtype as the first checked, a ``.bin`` of
        the size its index says); raises :class:`DatasetFormatError` naming the file otherwise. Reads headers
        only, so callers with every part at hand check them all before copying any."""
        h = read_index_header(idx_path(prefix))
        if self._dtype is None:
            self._dtype = h.dtype
        elif h.dtype != self._dtype:
            raise DatasetFormatError(f"{h.path}: dtype {np.dtype(h.dtype).name} differs from "
                                     f"{np.dtype(self._dtype).name}")
        check_bin_size(h)
        return h

    def add(self, prefix: str) -> None:
        h = self.check(prefix)
        if self._bin is None:
            os.makedirs(os.path.dirname(os.path.abspath(self._tmp)), exist_ok=True)
            self._bin = open(bin_path(self._tmp), "wb", buffering=0)
        append_file(bin_path(prefix), self._bin)
        self._prefixes.append(prefix)
        self._headers.append(h)

    def finish(self) -> IndexHeader:
        if not self._prefixes:
            raise ValueError("nothing to merge")
        self._bin.close()
        headers, dtype = self._headers, self._headers[0].dtype
        itemsize = np.dtype(dtype).itemsize
        n_seq = sum(h.sequence_count for h in headers)
        n_doc = sum(h.document_count for h in headers)
        with open(idx_path(self._tmp), "wb") as out:
            out.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, DTYPE_CODES[dtype], n_seq, n_doc + 1))
            for p in self._prefixes:
                _, lengths, _, _ = read_index_arrays(idx_path(p))
                out.write(np.asarray(lengths).tobytes())
            base = 0
            for p in self._prefixes:
                _, lengths, pointers, _ = read_index_arrays(idx_path(p))
                out.write((np.asarray(pointers) + base).tobytes())
                base += int(np.asarray(lengths, dtype=np.int64).sum()) * itemsize
            seq_base = 0
            out.write(np.zeros(1, dtype=np.int64).tobytes())
            for p, h in zip(self._prefixes, headers):
                _, _, _, doc_idx = read_index_arrays(idx_path(p))
                out.write((np.asarray(doc_idx[1:]) + seq_base).tobytes())
                seq_base += h.sequence_count
        publish(self._tmp, self.out_prefix)
        return read_index_header(idx_path(self.out_prefix))

    def abort(self) -> None:
        if self._bin is not None:
            self._bin.close()
        for path in (bin_path(self._tmp), idx_path(self._tmp)):
            if os.path.exists(path):
                os.remove(path)


def _merge_all(merger, prefixes: Sequence[str]) -> IndexHeader:
    """Every part checked (headers only) before any is copied, then all merged; nothing is left on failure."""
    if not prefixes:
        raise ValueError("nothing to merge")
    for p in prefixes:
        merger.check(p)
    try:
        for p in prefixes:
            merger.add(p)
        return merger.finish()
    except BaseException:
        merger.abort()
        raise


def merge_datasets(prefixes: Sequence[str], out_prefix: str) -> IndexHeader:
    """Concatenate indexed datasets (same dtype) in order into ``out_prefix``, streaming
    (:class:`DatasetMerger`). Output goes to temporary names, renamed at the end."""
    return _merge_all(DatasetMerger(out_prefix), prefixes)


class TokenRoleMerger:
    """:class:`DatasetMerger` for token datasets and their role channels together: each added part's channel is
    checked against its tokens (lengths, not contents); :meth:`finish` publishes the channel first, so an
    existing token dataset always has its matching channel."""

    def __init__(self, out_prefix: str):
        self.out_prefix = out_prefix
        self._roles, self._tokens = DatasetMerger(roles_prefix(out_prefix)), DatasetMerger(out_prefix)

    def check(self, prefix: str) -> IndexHeader:
        check_role_channel(prefix, deep=False)
        self._roles.check(roles_prefix(prefix))
        return self._tokens.check(prefix)

    def add(self, prefix: str) -> None:
        check_role_channel(prefix, deep=False)
        self._roles.add(roles_prefix(prefix))
        self._tokens.add(prefix)

    def finish(self) -> IndexHeader:
        self._roles.finish()
        return self._tokens.finish()

    def abort(self) -> None:
        self._roles.abort()
        self._tokens.abort()


def merge_token_role_datasets(prefixes: Sequence[str], out_prefix: str) -> IndexHeader:
    """Merge token datasets and their role channels, keeping the two aligned (roles published first)."""
    from megatron_anchor.tokenizer.record import dataset_record_path, merge_records, read_record, write_record

    from megatron_anchor.outputs import check_outputs

    if not prefixes:
        raise ValueError("nothing to merge")
    inputs = [("--input", path) for p in prefixes for path in (bin_path(p), idx_path(p), bin_path(roles_prefix(p)),
                                                               idx_path(roles_prefix(p)))]
    check_outputs([("--output-prefix", path) for path in (bin_path(out_prefix), idx_path(out_prefix),
                                                          bin_path(roles_prefix(out_prefix)),
                                                          idx_path(roles_prefix(out_prefix)))], inputs)
    record = merge_records([read_record(dataset_record_path(p)) for p in prefixes], out_prefix)
    header = _merge_all(TokenRoleMerger(out_prefix), prefixes)
    if record is not None:  # parts without records (e.g. a run's own part files) leave it to the caller
        write_record(dataset_record_path(out_prefix), record)
    return header


def check_bin_size(h: IndexHeader) -> None:
    """The ``.bin`` beside an index must hold exactly the tokens the index describes."""
    prefix = h.path[: -len(".idx")]
    bpath = bin_path(prefix)
    if not os.path.isfile(bpath):
        raise DatasetFormatError(f"{bpath}: data file not found")
    _, lengths, _, _ = read_index_arrays(h.path)
    want = total_length(lengths) * np.dtype(h.dtype).itemsize
    got = os.path.getsize(bpath)
    if got != want:
        raise DatasetFormatError(
            f"{bpath}: {got} bytes but {h.path} describes {want} (truncated, or .bin/.idx from different runs)"
        )


SCAN_BLOCK = 1 << 22
"""Elements per block in the whole-file checks below: a block's temporaries stay under ~40 MiB whatever the
dataset's size (the files themselves are memory-mapped and read through the page cache)."""


def _block_starts(n: int, block: int = SCAN_BLOCK) -> range:
    return range(0, n, block)


def total_length(lengths: np.ndarray, block: int = SCAN_BLOCK) -> int:
    """Sum of an int32 length array, accumulated block by block in int64 (no full-size int64 copy)."""
    return sum(int(lengths[i : i + block].sum(dtype=np.int64)) for i in _block_starts(len(lengths), block))


def first_difference(a: np.ndarray, b: np.ndarray, block: int = SCAN_BLOCK) -> int:
    """Index of the first element where equal-length arrays differ, or -1; compared block by block."""
    for i in _block_starts(len(a), block):
        diff = np.flatnonzero(a[i : i + block] != b[i : i + block])
        if len(diff):
            return i + int(diff[0])
    return -1


def check_role_channel(prefix: str, deep: bool = True) -> Tuple[IndexHeader, IndexHeader]:
    """Validate a token dataset and its role channel; raise :class:`DatasetFormatError` naming the problem.

    Checks: both pairs exist and are complete, roles are uint8, sequence lengths and document indices are
    equal. With ``deep``, also that every role code is known (reads the whole role ``.bin``).
    Time is linear in the number of sequences (plus tokens with ``deep``); extra memory is bounded by
    :data:`SCAN_BLOCK`, not by the dataset's size.
    """
    rprefix = roles_prefix(prefix)
    if not os.path.isfile(idx_path(rprefix)) and not os.path.isfile(bin_path(rprefix)):
        raise DatasetFormatError(
            f"{prefix}: role channel {rprefix}.{{bin,idx}} not found; preprocess the data with "
            "tools/preprocess_data.py (or train on plain token data with --no-role-channel)"
        )
    th = read_index_header(idx_path(prefix))
    rh = read_index_header(idx_path(rprefix))
    check_bin_size(th)
    check_bin_size(rh)
    if rh.dtype != ROLE_DTYPE:
        raise DatasetFormatError(f"{rh.path}: role channel dtype is {np.dtype(rh.dtype).name}, expected uint8")
    if (th.sequence_count, th.document_count) != (rh.sequence_count, rh.document_count):
        raise DatasetFormatError(
            f"{prefix}: role channel has {rh.sequence_count} sequences / {rh.document_count} documents but the "
            f"tokens have {th.sequence_count} / {th.document_count}"
        )
    _, tl, _, td = read_index_arrays(th.path)
    _, rl, _, rd = read_index_arrays(rh.path)
    bad = first_difference(tl, rl)
    if bad >= 0:
        raise DatasetFormatError(
            f"{prefix}: sequence {bad} has {int(tl[bad])} tokens but {int(rl[bad])} roles in {rh.path}"
        )
    if first_difference(td, rd) >= 0:
        raise DatasetFormatError(f"{prefix}: document indices of the role channel differ from the tokens'")
    if deep:
        unknown = unknown_role_codes(rprefix)
        if unknown:
            raise DatasetFormatError(f"{bin_path(rprefix)}: unknown role codes {sorted(unknown)}")
    return th, rh


def _role_bytes(rprefix: str) -> np.ndarray:
    path = bin_path(rprefix)
    return np.memmap(path, ROLE_DTYPE, "r") if os.path.getsize(path) else np.zeros(0, ROLE_DTYPE)


_MAX_KNOWN_CODE = max(KNOWN_ROLE_CODES)
_CODES_ARE_CONTIGUOUS = set(KNOWN_ROLE_CODES) == set(range(_MAX_KNOWN_CODE + 1))


def first_unknown_role(rprefix: str, start: int = 0, stop: int = -1, block: int = SCAN_BLOCK) -> int:
    """Offset of the first unknown role code in bytes ``[start, stop)`` of a role channel's ``.bin``, or -1.

    Reads the range block by block (one max per block when the codes are 0..N, the common case): time linear in
    the range, memory O(block).
    """
    data = _role_bytes(rprefix)
    stop = len(data) if stop < 0 else min(stop, len(data))
    for i in range(start, stop, block):
        chunk = data[i : min(i + block, stop)]
        if _CODES_ARE_CONTIGUOUS and int(chunk.max(initial=0)) <= _MAX_KNOWN_CODE:
            continue
        bad = np.flatnonzero(~np.isin(chunk, np.asarray(sorted(KNOWN_ROLE_CODES), dtype=ROLE_DTYPE)))
        if len(bad):
            return i + int(bad[0])
    return -1


def unknown_role_codes(rprefix: str, block: int = SCAN_BLOCK) -> List[int]:
    """Role codes in a role channel's ``.bin`` that :class:`~megatron_anchor.roles.Role` does not define.

    Counted block by block (a block's counts cost 8 bytes per element), so memory stays bounded.
    """
    data = _role_bytes(rprefix)
    counts = np.zeros(256, dtype=np.int64)
    for i in _block_starts(len(data), block):
        counts += np.bincount(data[i : i + block], minlength=256)
    return [c for c in np.flatnonzero(counts).tolist() if c not in KNOWN_ROLE_CODES]


def iter_documents(prefix: str) -> Iterable[np.ndarray]:
    """Yield each document's array (for inspection and tests; one sequence per document assumed)."""
    h, lengths, pointers, _ = read_index_arrays(idx_path(prefix))
    data = np.memmap(bin_path(prefix), h.dtype, "r") if os.path.getsize(bin_path(prefix)) else np.zeros(0, h.dtype)
    itemsize = np.dtype(h.dtype).itemsize
    for n, p in zip(np.asarray(lengths), np.asarray(pointers)):
        start = int(p) // itemsize
        yield np.array(data[start : start + int(n)])
