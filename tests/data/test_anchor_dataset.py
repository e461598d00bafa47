"""AnchorGPTDataset: the parent's samples unchanged, plus roles aligned with labels."""

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_anchor.data.anchor_dataset import AnchorGPTDataset
from megatron_anchor.data.indexed import (
    DatasetFormatError,
    roles_prefix,
    write_documents,
    write_token_role_documents,
)
from megatron_anchor.roles import ROLE_DTYPE, Role


class _Tok:
    """The least a GPTDatasetConfig needs from a tokenizer."""

    def __init__(self, vocab_size, eod):
        self.vocab_size, self.eod = vocab_size, eod
        self.unique_identifiers = {"class": "_Tok", "vocab_size": vocab_size}


def _config(prefix, tok, cache, seq=32, extra_token=True, eod_mask=False):
    return GPTDatasetConfig(
        random_seed=1234, sequence_length=seq, blend=([prefix], None), split="90,10,0", tokenizer=tok,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask,
        create_attention_mask=False, path_to_cache=str(cache), add_extra_token_to_sequence=extra_token,
    )


def _build(cls, cfg, sizes=(200, 20, 0)):
    return BlendedMegatronDatasetBuilder(cls, list(sizes), lambda: True, cfg).build()


def role_of(token_ids):
    """The synthetic dataset below gives every token id a role determined by the id."""
    return 1 + (token_ids % 6)


@pytest.fixture
def keyed_dataset(tmp_path):
    """Documents whose roles are a function of the token id, so alignment can be checked anywhere."""
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(80):
        ids = rng.integers(0, 500, rng.integers(3, 60)).astype(np.uint16)
        ids[-1] = 499  # EOD
        pairs.append((ids, role_of(ids.astype(np.int64)).astype(ROLE_DTYPE)))
    prefix = str(tmp_path / "keyed")
    write_token_role_documents(prefix, pairs, np.uint16)
    return prefix, _Tok(500, 499)


@pytest.mark.parametrize("extra_token", [True, False])
def test_samples_match_stock_and_roles_align_with_labels(keyed_dataset, tmp_path, extra_token):
    prefix, tok = keyed_dataset
    cfg = _config(prefix, tok, tmp_path / "cache", extra_token=extra_token, eod_mask=True)
    ours = _build(AnchorGPTDataset, cfg)
    stock = _build(GPTDataset, cfg)
    for split in (0, 1):
        assert len(ours[split]) == len(stock[split])
        for i in range(len(ours[split])):
            a, b = ours[split][i], stock[split][i]
            for k in b:
                assert torch.equal(a[k], b[k]), k
            roles = a["roles"]
            assert roles.dtype == torch.uint8 and roles.shape == a["labels"].shape
            pad = roles == Role.PAD
            assert torch.equal(roles[~pad].long(), role_of(a["labels"][~pad]))
            if extra_token:
                assert not pad.any()
            else:  # the last label is rolled in from outside the sample: padding
                assert pad[-1] and not pad[:-1].any()


def test_missing_or_mismatched_channel_fails_at_load(keyed_dataset, tmp_path):
    prefix, tok = keyed_dataset
    write_documents(roles_prefix(prefix), [np.ones(5, ROLE_DTYPE)] * 80, ROLE_DTYPE)
    with pytest.raises(DatasetFormatError, match="cannot use .*keyed as anchored training data: .*sequence 0"):
        _build(AnchorGPTDataset, _config(prefix, tok, tmp_path / "c1"))
    import os

    for ext in (".bin", ".idx"):
        os.remove(roles_prefix(prefix) + ext)
    with pytest.raises(DatasetFormatError, match="role channel .* not found"):
        _build(AnchorGPTDataset, _config(prefix, tok, tmp_path / "c2"))


def test_real_preprocessed_dataset(tiny_dataset, tmp_path):
    from megatron_anchor.tokenizer import build_tokenizer

    tok = build_tokenizer(tiny_dataset["tokenizer_type"], tiny_dataset["tokenizer_model"])
    train, _, _ = _build(AnchorGPTDataset, _config(tiny_dataset["prefix"], tok, tmp_path / "c", seq=128), (50, 5, 0))
    seen = set()
    for i in range(len(train)):
        s = train[i]
        seen |= set(s["roles"].tolist())
        # delimiter ids only ever carry ANNOTATION_KEY, EOD ids only EOD
        labels, roles = s["labels"], s["roles"]
        assert (roles[(labels == tok.ann_open) | (labels == tok.ann_close)] == Role.ANNOTATION_KEY).all()
        assert (roles[labels == tok.eod] == Role.EOD).all()
    assert {int(Role.TEXT), int(Role.ANNOTATION_KEY), int(Role.ANNOTATION_VALUE), int(Role.EOD)} <= seen


def test_low_level_dataset_pickles(keyed_dataset):
    import pickle

    from megatron_anchor.data.anchor_dataset import RoleChannelIndexedDataset

    prefix, _ = keyed_dataset
    ds = RoleChannelIndexedDataset(prefix)
    copy = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(copy.get(3, 1, 2), ds.get(3, 1, 2))
    assert np.array_equal(copy.get_roles(3), role_of(copy.get(3).astype(np.int64)))
    assert np.array_equal(copy.get_roles(3, 1, 2), role_of(copy.get(3, 1, 2).astype(np.int64)))


def test_tripwire_when_the_parent_reads_tokens_another_way(keyed_dataset, tmp_path):
    """If megatron-core stopped reading tokens through ``bin_reader.read``, no role would be recorded: the
    dataset must fail loudly, never pad the sample with PAD (which would silently drop its loss)."""
    prefix, tok = keyed_dataset
    train, _, _ = _build(AnchorGPTDataset, _config(prefix, tok, tmp_path / "cache"))
    train[0]  # the intact path works
    low = train.dataset
    low.bin_reader = low.bin_reader.inner  # what an upstream change of the read path amounts to
    with pytest.raises(RuntimeError, match="role channel out of step with the tokens"):
        train[1]


def test_parent_internals_the_role_channel_relies_on():
    """Tripwires on the megatron-core internals AnchorGPTDataset wraps, so an upgrade fails here first."""
    import inspect

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert hasattr(GPTDataset, "_query_document_sample_shuffle_indices")
    assert "bin_reader" in inspect.getsource(IndexedDataset.get)
    assert "self.dataset.get(" in inspect.getsource(GPTDataset._query_document_sample_shuffle_indices)
    assert "build_low_level_dataset" in GPTDataset.__dict__


def _big_dataset(tmp_path, n_tokens, doc_len=4096):
    """A token + role dataset of ``n_tokens`` written straight with numpy (fast, no tokenizer)."""
    from megatron_anchor.data.indexed import _write_index, bin_path, idx_path

    n_docs = n_tokens // doc_len
    prefix = str(tmp_path / "big_text_document")
    lengths = np.full(n_docs, doc_len, dtype=np.int32)
    for p, dtype, fill in ((prefix, np.uint16, 7), (roles_prefix(prefix), ROLE_DTYPE, int(Role.TEXT))):
        block = np.full(1 << 22, fill, dtype=dtype)
        with open(bin_path(p), "wb") as f:
            left = n_docs * doc_len
            while left:
                n = min(left, len(block))
                f.write(block[:n].tobytes())
                left -= n
        with open(idx_path(p), "wb") as f:
            _write_index(f, dtype, lengths, np.arange(n_docs + 1, dtype=np.int64))
    return prefix


def test_startup_checks_use_bounded_memory(tmp_path):
    """Header, length, document-index and role-code checks on 60M tokens allocate far less than the 8 bytes per
    token a whole-file bincount took (480 MB here), and find a bad code wherever it is."""
    import tracemalloc

    from megatron_anchor.data.indexed import bin_path, check_role_channel, first_unknown_role

    prefix = _big_dataset(tmp_path, 60_000_000)
    tracemalloc.start()
    check_role_channel(prefix, deep=True)
    assert first_unknown_role(roles_prefix(prefix)) == -1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20, f"start-up checks allocated {peak / 2**20:.0f} MiB"
    with open(bin_path(roles_prefix(prefix)), "r+b") as f:
        f.seek(41_000_123)
        f.write(bytes([200]))
    assert first_unknown_role(roles_prefix(prefix)) == 41_000_123
    assert first_unknown_role(roles_prefix(prefix), 0, 41_000_000) == -1
    with pytest.raises(DatasetFormatError, match="unknown role codes \\[200\\]"):
        check_role_channel(prefix, deep=True)
