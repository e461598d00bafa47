"""Tokenizer, datasets provider and resumable data iterators.

Datasets are megatron-core's: ``AnchorGPTDataset`` (samples carry ``roles``) through
``BlendedMegatronDatasetBuilder``; ``GPTDataset`` for a stock baseline (``--no-role-channel``) and
``MockGPTDataset`` for ``--mock-data``. The data position is the number of consumed training samples; the
sampler restarts exactly there on resume.
"""

from __future__ import annotations

import os
import signal
from functools import partial
from typing import Iterator, List, Optional, Sequence

import torch

from megatron_anchor.training.blend import Blend, data_blend
from megatron_anchor.training.config_io import ConfigError
from megatron_anchor.training.config import AnchorConfig


class NullTokenizer:
    """Vocabulary-size-only tokenizer for mock data and pre-tokenized data; EOD is the last id."""

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1
        # megatron-core's dataset cache key serialises the tokenizer through this attribute.
        self.unique_identifiers = {"class": "NullTokenizer", "vocab_size": self.vocab_size}

    def encode_text(self, text: str) -> List[int]:  # pragma: no cover - not meaningful without a vocabulary
        raise NotImplementedError("NullTokenizer cannot encode text")


def build_tokenizer(cfg: AnchorConfig):
    """The run's tokenizer (its ``vocab_size`` includes the annotation special tokens)."""
    d = cfg.data
    if d.tokenizer_type in (None, "NullTokenizer"):
        return NullTokenizer(d.vocab_size)
    from megatron_anchor.tokenizer import TokenizerError, build_tokenizer as _build

    try:
        return _build(d.tokenizer_type, d.tokenizer_model, eod_token=d.eod_token)
    except TokenizerError as exc:
        raise ConfigError(str(exc)) from None


def run_tokenizer_record(cfg: AnchorConfig, tokenizer) -> Optional[dict]:
    """The tokenizer record of this run (None for NullTokenizer: nothing to compare)."""
    if isinstance(tokenizer, NullTokenizer):
        return None
    from megatron_anchor.tokenizer.record import tokenizer_record

    return tokenizer_record(tokenizer, cfg.data.tokenizer_type)


def _blend(cfg: AnchorConfig, run) -> Blend:
    """The run's blend: the one its :class:`~megatron_anchor.training.resolved.ResolvedRun` holds, else parsed from
    ``cfg`` (callers that build data outside a training run)."""
    return run.blend if run is not None else data_blend(cfg)


def check_data_paths(cfg: AnchorConfig, tokenizer=None, run=None) -> None:
    """Fail before any step when a data file, its role channel or its tokenizer record does not fit the run.

    Per prefix: both files exist; the role channel's headers, sizes, sequence lengths and document indices match
    the tokens' (time linear in the number of documents, memory bounded by
    :data:`megatron_anchor.data.indexed.SCAN_BLOCK`); the dataset's tokenizer record (written by the data tools)
    has this run's ids; packed SFT data is trained with ``--reset-attention-mask``. The role *codes* are scanned
    after the process groups exist, split over all ranks (:func:`scan_role_channels`). ``run``: the
    :class:`~megatron_anchor.training.resolved.ResolvedRun` (its tokenizer record and blend), if there is one.
    """
    d = cfg.data
    if d.mock_data:
        return
    from megatron_anchor.data.indexed import DatasetFormatError, check_role_channel, read_index_header

    if run is not None:
        run_record = run.tokenizer_record
    else:
        run_record = run_tokenizer_record(cfg, tokenizer) if tokenizer is not None else None
    blend = _blend(cfg, run)
    for prefix, policy in zip(blend.prefixes, blend.policies):
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ConfigError(f"data file {prefix + ext} not found (--data-path takes the prefix without "
                                  ".bin/.idx)")
        try:
            if d.no_role_channel:
                from megatron_anchor.data.indexed import check_bin_size

                check_bin_size(read_index_header(prefix + ".idx"))
            else:
                check_role_channel(prefix, deep=False)
        except DatasetFormatError as exc:
            what = "token data" if d.no_role_channel else "token data or its role channel"
            raise ConfigError(f"{what} of {prefix}: {exc}") from None
        _check_split_nonempty(cfg, prefix)
        _check_dataset_record(cfg, prefix, run_record)
        if not d.no_role_channel:
            check_loss_tokens(prefix, policy)


LOSS_PROBE_TOKENS = 1 << 16
"""Tokens at the start of each dataset whose roles :func:`check_loss_tokens` counts."""
SPARSE_LOSS_SHARE = 0.02
"""A policy that leaves less than this share of the probed tokens with loss gets a warning."""


def check_loss_tokens(prefix: str, policy: str) -> None:
    """Refuse a loss-mask policy that leaves nothing to learn on this data but end-of-document tokens.

    ``sft-anchored`` on pretraining data (roles TEXT and ANNOTATION, no RESPONSE) would train on EOD tokens only,
    or on nothing (gradient norm 0), without a word. Counts the roles of the first :data:`LOSS_PROBE_TOKENS` tokens
    of the role channel (one read of at most 64 KiB); a share of loss tokens below :data:`SPARSE_LOSS_SHARE` is
    only a warning (long prompts, short responses)."""
    import logging

    import numpy as np

    from megatron_anchor.data.indexed import bin_path, roles_prefix
    from megatron_anchor.roles import Role
    from megatron_anchor.training.loss import POLICY_ROLES

    path = bin_path(roles_prefix(prefix))
    size = os.path.getsize(path)
    if size == 0:
        return
    roles = np.fromfile(path, dtype=np.uint8, count=min(size, LOSS_PROBE_TOKENS))
    counts = np.bincount(roles, minlength=256)
    real = int(counts.sum() - counts[int(Role.PAD)])
    kept = POLICY_ROLES[policy]
    learned = sum(int(counts[int(r)]) for r in kept if r != Role.EOD)
    share = sum(int(counts[int(r)]) for r in kept) / max(real, 1)
    present = ", ".join(f"{Role(c).name} {counts[c] / max(real, 1):.0%}" for c in range(len(Role))
                        if counts[c] and c != int(Role.PAD))
    if learned == 0:
        hint = ("this is pretraining data (tools/preprocess_data.py): use --loss-mask-policy pretrain, or SFT data "
                "written by tools/preprocess_sft.py" if policy in ("sft-anchored", "sft-standard")
                else "check that --data-path names the data you meant")
        raise ConfigError(f"--loss-mask-policy {policy} leaves no token but end-of-document ones with loss in the "
                          f"first {len(roles):,} tokens of {prefix} (roles there: {present or 'none'}): the run "
                          f"would learn nothing; {hint}")
    if share < SPARSE_LOSS_SHARE and os.environ.get("RANK", "0") == "0":
        logging.getLogger(__name__).warning(
            "--loss-mask-policy %s leaves only %.2f%% of the first %d tokens of %s with loss (roles there: %s)",
            policy, 100 * share, len(roles), prefix, present)


def _check_dataset_record(cfg: AnchorConfig, prefix: str, run_record: Optional[dict]) -> None:
    from megatron_anchor.tokenizer.record import dataset_record_path, read_record, record_mismatches

    try:
        record = read_record(dataset_record_path(prefix))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if record is None:
        return  # data written by other tools (e.g. stock Megatron-LM): nothing recorded to compare
    if record.get("packed") and not cfg.data.reset_attention_mask:
        raise ConfigError(f"{prefix} holds packed SFT samples (written with --pack): pass --reset-attention-mask "
                          "so that no sample attends to another")
    if run_record is not None:
        problems = record_mismatches(record, run_record)
        if problems:
            raise ConfigError(f"{prefix} was written with another tokenizer than this run's "
                              f"({dataset_record_path(prefix)}):\n    " + "\n    ".join(problems))


def scan_role_channels(cfg: AnchorConfig, device, run=None) -> None:
    """Check every role code of every role channel once per job: each rank scans an equal byte range of each
    file in bounded blocks, and the first bad offset is agreed with one all-reduce, so every rank fails alike.

    Time per rank: tokens / world size; memory: one block (:data:`megatron_anchor.data.indexed.SCAN_BLOCK`).
    """
    d = cfg.data
    if d.mock_data or d.no_role_channel:
        return
    import torch.distributed as dist

    from megatron_anchor.data.indexed import bin_path, first_unknown_role, roles_prefix
    from megatron_anchor.roles import role_name

    prefixes = _blend(cfg, run).prefixes
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    sizes = [os.path.getsize(bin_path(roles_prefix(p))) for p in prefixes]
    first_bad = torch.tensor([size + 1 for size in sizes], dtype=torch.int64, device=device)
    for i, (prefix, size) in enumerate(zip(prefixes, sizes)):
        bad = first_unknown_role(roles_prefix(prefix), size * rank // world, size * (rank + 1) // world)
        if bad >= 0:
            first_bad[i] = bad
    if world > 1:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    for prefix, size, bad in zip(prefixes, sizes, first_bad.tolist()):
        if bad <= size:
            import numpy as np

            path = bin_path(roles_prefix(prefix))
            code = int(np.memmap(path, np.uint8, "r")[bad])
            raise ConfigError(f"{path}: unknown role code {role_name(code)} at token {bad}; the role channel is "
                              "corrupt or from another tool: check it with tools/inspect_dataset.py and rewrite it")


def _check_split_nonempty(cfg: AnchorConfig, prefix: str) -> None:
    """A split with a positive weight but no documents makes megatron's index builder loop forever, whether or not
    the run reads from it (it is built even for zero samples, e.g. validation with --eval-iters 0)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    weights = [float(x) for x in _split_string(cfg.data.split).split(",")]
    total = sum(weights)
    num_docs = len(IndexedDataset(prefix, mmap=True).sequence_lengths)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w / total)
    for i, split in enumerate(Split):
        begin, end = int(round(bounds[i] * num_docs)), int(round(bounds[i + 1] * num_docs))
        if weights[i] > 0 and end <= begin:
            zeroed = ",".join("0" if j == i else f"{w:g}" for j, w in enumerate(weights))
            raise ConfigError(
                f"--split {cfg.data.split} leaves the {split.name} split of {prefix} ({num_docs} documents) "
                f"empty: with {num_docs} documents it needs about {1 / max(num_docs, 1):.1%} of the weight or more; "
                f"give it more weight, weight 0 (--split {zeroed}), or use more data"
            )


def _split_string(split: str) -> str:
    return ",".join(split.replace("/", ",").split(","))


def dataset_sizes(cfg: AnchorConfig) -> List[int]:
    """Samples needed from train/valid/test: every step's global batch, every evaluation's batches."""
    t, lg = cfg.training, cfg.logging
    gbs = t.global_batch_size
    evals = (t.train_iters // lg.eval_interval + 1) if lg.eval_interval else 1
    return [t.train_iters * gbs, evals * lg.eval_iters * gbs, lg.eval_iters * gbs]


def build_datasets(cfg: AnchorConfig, tokenizer, is_built_on_rank=lambda: True, run=None):
    """train/valid/test datasets (any may be None when its split is empty); ``run``: the run's
    :class:`~megatron_anchor.training.resolved.ResolvedRun`, whose blend is read (parsed from ``cfg`` without one)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    d, t = cfg.data, cfg.training
    common = dict(
        random_seed=t.seed,
        sequence_length=cfg.model.seq_length,
        tokenizer=tokenizer,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=t.eod_mask_loss,
        # Never a dense mask: document boundaries reach the attention as cu_seqlens (training/packing.py), the
        # only form Transformer Engine's fused attention honours.
        create_attention_mask=False,
        path_to_cache=d.data_cache_path,
        mmap_bin_files=True,
    )
    if d.mock_data:
        dataset_cls = MockGPTDataset
        config = GPTDatasetConfig(blend=None, split=_split_string(d.split), **common)
    else:
        # With replay, megatron-core's BlendedDataset tags each sample with its dataset's index in this blend
        # (``dataset_id``); the forward step reads each sample's loss-mask policy from it.
        blend = _blend(cfg, run)
        config = GPTDatasetConfig(blend=(blend.prefixes, blend.weights), split=_split_string(d.split), **common)
        if d.no_role_channel:
            dataset_cls = GPTDataset
        else:
            from megatron_anchor.data.anchor_dataset import AnchorGPTDataset

            dataset_cls = AnchorGPTDataset
    return BlendedMegatronDatasetBuilder(dataset_cls, dataset_sizes(cfg), is_built_on_rank, config).build()


class ResumableSampler:
    """Yields this data-parallel rank's micro-batch index lists, starting from ``consumed_samples``.

    Sample ``consumed + k`` of a global batch goes to DP rank ``(k // mbs) % dp`` so that a run resumed at any
    step, with any TP/PP layout, reads the same samples the uninterrupted run would have read.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int):
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self):
        return max(self.total - self.consumed, 0) // (self.mbs * self.dp_size)

    def __iter__(self):
        stride = self.mbs * self.dp_size
        start = self.consumed
        while start + stride <= self.total:
            first = start + self.dp_rank * self.mbs
            yield list(range(first, first + self.mbs))
            start += stride


def collate_with_boundaries(samples, eod: int):
    """Default collation plus the micro-batch's document boundaries (``--reset-attention-mask``)."""
    from megatron_anchor.training.packing import add_boundaries

    return add_boundaries(torch.utils.data.default_collate(samples), eod)


def ignore_exit_signals(names: Sequence[str], _worker_id: int) -> None:
    """DataLoader worker start-up: leave the run's exit signals (SIGTERM, ``--exit-signal``) to the main process.

    A scheduler's preemption signal reaches every process of the job (Slurm's ``--signal`` without ``B:``); a worker
    that died of it would make the main process raise mid-step instead of finishing the step and saving. Workers
    still end when the main process shuts them down (through their queues) or dies (torch's watchdog)."""
    for name in names:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def build_iterator(dataset, consumed_samples: int, cfg: AnchorConfig, dp_rank: int, dp_size: int,
                   cyclic: bool = False, eod: Optional[int] = None) -> Optional[Iterator]:
    """A DataLoader iterator over ``dataset`` from ``consumed_samples`` on; cyclic for validation.

    With ``--reset-attention-mask`` each micro-batch also carries its document boundaries (``eod`` needed).
    """
    if dataset is None:
        return None
    t = cfg.training
    collate = None
    if cfg.data.reset_attention_mask:
        if eod is None:
            raise ValueError("--reset-attention-mask needs the end-of-document id to find document boundaries")
        collate = partial(collate_with_boundaries, eod=eod)

    def make(consumed):
        sampler = ResumableSampler(len(dataset), consumed, t.micro_batch_size, dp_rank, dp_size)
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=cfg.data.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=cfg.data.num_workers > 0,
            worker_init_fn=(partial(ignore_exit_signals, sorted({"SIGTERM", t.exit_signal}))
                            if cfg.data.num_workers > 0 and t.exit_signal_handler else None),
            # Its own generator: creating a DataLoader iterator draws a seed, and drawing it from the global
            # generator would shift dropout after a resume (the iterator is built after RNG is restored).
            generator=torch.Generator().manual_seed(t.seed),
        )

    if not cyclic:
        return iter(make(consumed_samples))

    def forever():
        while True:
            for batch in make(0):
                yield batch

    return forever()


def validation_enabled(cfg: AnchorConfig) -> bool:
    """Whether the run evaluates: validation batches requested and a validation split with weight (identical on
    every rank, whether or not the rank reads data)."""
    weights = [float(x) for x in _split_string(cfg.data.split).split(",")]
    return cfg.logging.eval_iters > 0 and weights[1] > 0


def build_data(cfg: AnchorConfig, tokenizer, consumed_train_samples: int, dp_rank: int, dp_size: int,
               reads: bool = True, run=None):
    """The datasets provider: (train iterator from the data position, factory of validation iterators).

    Each call of the factory starts at the first validation sample, so every evaluation scores the same
    batches and validation curves are comparable across steps and resumed runs. With ``reads=False`` (a rank
    that receives its batches from its tensor-parallel group's reader, or uses none) nothing is read: the
    iterator is None and the factory returns None. ``run``: the run's
    :class:`~megatron_anchor.training.resolved.ResolvedRun` (its blend), when set-up passes one.
    """
    train_ds, valid_ds, _test_ds = build_datasets(cfg, tokenizer, is_built_on_rank=lambda: reads, run=run)
    if not reads:
        return None, lambda: None
    eod = tokenizer.eod
    train_iter = build_iterator(train_ds, consumed_train_samples, cfg, dp_rank, dp_size, eod=eod)

    def make_valid_iter():
        return build_iterator(valid_ds, 0, cfg, dp_rank, dp_size, cyclic=True, eod=eod)

    return train_iter, make_valid_iter
