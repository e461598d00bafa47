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
