"""The token + role indexed format: byte compatibility with megatron-core, merging, corruption detection."""

import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_anchor.data.indexed import (
    DatasetFormatError,
    TokenRoleMerger,
    check_role_channel,
    iter_documents,
    merge_datasets,
    merge_token_role_datasets,
    roles_prefix,
    write_documents,
    write_token_role_documents,
)
from megatron_anchor.roles import ROLE_DTYPE
from tests.conftest import file_bytes


def _docs(seed, n, dtype=np.uint16):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 1000, rng.integers(1, 50)).astype(dtype) for _ in range(n)]
    roles = [rng.integers(1, 7, len(d)).astype(ROLE_DTYPE) for d in docs]
    return list(zip(docs, roles))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8])
def test_bytes_equal_megatron_builder(tmp_path, dtype):
    docs = [d for d, _ in _docs(0, 37, dtype)]
    ours = str(tmp_path / "ours")
    write_documents(ours, docs, dtype)
    theirs = str(tmp_path / "theirs")
    b = IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for d in docs:
        b.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    b.finalize(theirs + ".idx")
    for ext in (".bin", ".idx"):
        assert open(ours + ext, "rb").read() == open(theirs + ext, "rb").read()
    ds = IndexedDataset(ours)
    assert len(ds) == len(docs) and all(np.array_equal(ds[i], d) for i, d in enumerate(docs))


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "portable-copy"])
def test_merge_equals_single_write_and_megatron_add_index(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:  # what a platform or file system without copy_file_range gets
        def refuse(*a, **k):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    pairs = _docs(1, 60)
    single = str(tmp_path / "single")
    write_token_role_documents(single, pairs, np.uint16)
    parts = []
    for i, (a, b) in enumerate([(0, 10), (10, 10), (10, 45), (45, 60)]):  # includes an empty part
        p = str(tmp_path / f"part{i}")
        write_token_role_documents(p, pairs[a:b], np.uint16)
        parts.append(p)
    merged = str(tmp_path / "merged")
    merge_token_role_datasets(parts, merged)
    assert file_bytes(merged) == {k.replace("single", "merged"): v for k, v in file_bytes(single).items()}
    # megatron-core's own merge gives the same token files
    b = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for p in parts:
        b.add_index(p)
    b.finalize(str(tmp_path / "mc.idx"))
    assert open(str(tmp_path / "mc.idx"), "rb").read() == open(merged + ".idx", "rb").read()
    check_role_channel(merged)


def test_a_failed_merge_leaves_nothing(tmp_path, monkeypatch):
    """A part that does not fit (another dtype, a truncated .bin) stops the merge with its name; the temporary
    output is removed and no file appears under the output's name, whatever was appended before."""
    pairs = _docs(5, 20)
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    write_token_role_documents(good, pairs, np.uint16)
    write_token_role_documents(bad, [(d.astype(np.int32), r) for d, r in pairs], np.int32)
    out = str(tmp_path / "out")
    import megatron_anchor.data.indexed as indexed

    copied = []
    real_append = indexed.append_file
    monkeypatch.setattr(indexed, "append_file", lambda src, dst: (copied.append(src), real_append(src, dst)))
    with pytest.raises(DatasetFormatError, match="bad.idx: dtype int32 differs from uint16"):
        merge_token_role_datasets([good, good, bad], out)
    assert copied == []  # every part is checked before any is copied
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]
    write_token_role_documents(bad, pairs, np.uint16)
    with open(bad + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(bad + ".bin") - 2)
    merger = TokenRoleMerger(out)  # as preprocessing uses it: parts added while later ones are written
    merger.add(good)
    with pytest.raises(DatasetFormatError, match=r"bad\.bin: .* bytes but"):
        merger.add(bad)
    merger.abort()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]


def test_truncated_and_mismatched_files_are_detected(tmp_path):
    pairs = _docs(2, 20)
    p = str(tmp_path / "d")
    write_token_role_documents(p, pairs, np.uint16)
    check_role_channel(p)

    with open(p + ".bin", "r+b") as f:  # truncated .bin
        f.truncate(os.path.getsize(p + ".bin") - 2)
    with pytest.raises(DatasetFormatError, match=r"d\.bin: .* bytes but"):
        check_role_channel(p)
    write_token_role_documents(p, pairs, np.uint16)

    with open(p + ".idx", "r+b") as f:  # truncated .idx
        f.truncate(40)
    with pytest.raises(DatasetFormatError, match="truncated or corrupt"):
        check_role_channel(p)
    write_token_role_documents(p, pairs, np.uint16)

    other = _docs(3, 20)  # roles from another dataset: lengths differ
    write_documents(roles_prefix(p), [r for _, r in other], ROLE_DTYPE)
    with pytest.raises(DatasetFormatError, match="sequence 0 has|sequences"):
        check_role_channel(p)

    write_documents(roles_prefix(p), [r for _, r in pairs], np.uint16)  # wrong dtype
    with pytest.raises(DatasetFormatError, match="expected uint8"):
        check_role_channel(p)

    write_documents(roles_prefix(p), [np.full_like(r, 9) for _, r in pairs], ROLE_DTYPE)  # unknown codes
    with pytest.raises(DatasetFormatError, match="unknown role codes"):
        check_role_channel(p)

    for ext in (".bin", ".idx"):
        os.remove(roles_prefix(p) + ext)
    with pytest.raises(DatasetFormatError, match="role channel .* not found"):
        check_role_channel(p)

    with open(p + ".idx", "r+b") as f:
        f.write(b"JUNK")
    with pytest.raises(DatasetFormatError, match="bad magic"):
        merge_datasets([p], str(tmp_path / "x"))


def test_iter_documents(tmp_path):
    pairs = _docs(4, 5)
    p = str(tmp_path / "d")
    write_token_role_documents(p, pairs, np.uint16)
    assert all(np.array_equal(a, d) for a, (d, _) in zip(iter_documents(p), pairs))
    assert all(np.array_equal(a, r) for a, (_, r) in zip(iter_documents(roles_prefix(p)), pairs))
