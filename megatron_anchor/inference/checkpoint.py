"""Load a megatron-anchor checkpoint, saved under any TP/PP layout, into one process.

The checkpoint is read by megatron-core's own ``dist_checkpointing.load`` into a TP=1, PP=1 ``GPTModel``: its
sharded tensors are stored with their global shapes, so megatron reassembles any saved split (fused QKV,
SwiGLU halves, vocabulary shards, pipeline stages) for us. What comes out is a plain full state dict in megatron's
names, which :mod:`megatron_anchor.inference.model` and :mod:`megatron_anchor.export` turn into their own layouts.

The model architecture comes from the ``run_config.yaml`` the trainer writes beside its checkpoints, or from the
trainer's own flags (``--config run.yaml`` or ``--num-layers ...``): :func:`config_from_args` goes through the
trainer's parser.

Trust: reading a checkpoint unpickles its ``.metadata`` and ``common.pt`` (torch distributed checkpointing), so a
crafted checkpoint runs code in this process. Load only checkpoints you or your cluster wrote. What can be
checked without unpickling (the files a checkpoint must have, their recorded sizes, the tokenizer record) is
checked first (:mod:`megatron_anchor.training.checkpoint_files`).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from megatron_anchor.training.checkpoint_files import TRACKER_FILE, describe_read_error, read_errors
from megatron_anchor.training.config import AnchorConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or matched to the given model configuration."""


_UNREADABLE = read_errors()
"""What reading a damaged checkpoint raises (:func:`megatron_anchor.training.checkpoint_files.read_errors`)."""


def save_dir_file(load: str, name: str) -> Optional[str]:
    """A file the trainer writes beside its checkpoints (``run_config.yaml``, ``tokenizer_record.json``): in the
    ``--save`` directory ``load``, or one level up when ``load`` is one of its ``iter_XXXXXXX`` folders; None
    when neither holds it."""
    for folder in (load, os.path.dirname(os.path.normpath(load))):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def config_from_args(argv: Sequence[str], load: Optional[str] = None) -> AnchorConfig:
    """An inference-ready config from the trainer's model flags (``--config run.yaml``, ``--num-layers`` ...).

    When no ``--config`` is given and the checkpoint directory (``load`` or ``--load``) holds the
    ``run_config.yaml`` the trainer writes, that file is the base and the given flags override it.
    Derived defaults (ffn size, max positions) are filled exactly as the trainer fills them; data, batch and
    parallel settings are irrelevant here and reset so they cannot make the config invalid.
    """
    from megatron_anchor.training.arguments import parse_args
    from megatron_anchor.training.checkpoint_files import RUN_CONFIG_FILE

    argv = list(argv)
    if load is None and "--load" in argv[:-1]:
        load = argv[argv.index("--load") + 1]
    if load and not os.path.isdir(load):
        raise CheckpointError(f"checkpoint directory {load!r} "
                              + ("is a file" if os.path.exists(load) else "does not exist"))
    run_config = save_dir_file(load, RUN_CONFIG_FILE) if load and "--config" not in argv else None
    if run_config:
        argv = ["--config", run_config] + argv

    try:
        cfg = parse_args(list(argv))
    except SystemExit as exc:  # argparse already printed the reason
        raise CheckpointError(f"bad model flags: {' '.join(argv)}") from exc
    return prepare_config(cfg)


def prepare_config(cfg: AnchorConfig) -> AnchorConfig:
    """Copy of ``cfg`` laid out for one process (TP=1, PP=1, local layers, no data), with defaults filled."""
    from megatron_anchor.training.arguments import ConfigError, validate

    cfg = copy.deepcopy(cfg)
    cfg.parallel.tensor_model_parallel_size = 1
    cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.sequence_parallel = False
    cfg.parallel.use_distributed_optimizer = False
    cfg.parallel.distributed_backend = "gloo"
    cfg.model.transformer_impl = "local"
    cfg.data.data_path = []
    cfg.data.replay_data_path, cfg.data.replay_share = [], 0.0
    cfg.data.mock_data = True
    cfg.data.no_role_channel = False
    cfg.training.loss_mask_policy = "pretrain"
    cfg.training.bf16 = False
    cfg.training.micro_batch_size, cfg.training.global_batch_size = 1, 1
    if not cfg.data.tokenizer_type:
        raise CheckpointError("the model's tokenizer is needed: pass --tokenizer-type and --tokenizer-model "
                              "(or a --config run.yaml holding them)")
    try:
        validate(cfg, world_size=1, has_cuda=False, has_te=False)
    except ConfigError as exc:
        raise CheckpointError(f"model configuration: {exc}") from None
    return cfg


def resolve_checkpoint(load: str, iteration: Optional[int] = None) -> str:
    """The ``iter_XXXXXXX`` directory to read: ``load`` itself when it is one, else its latest (or ``iteration``).

    Raises :class:`CheckpointError` naming what is missing when ``load`` is not a megatron-anchor checkpoint.
    """
    if not load or not os.path.isdir(load):
        raise CheckpointError(f"checkpoint directory {load!r} does not exist")
    if os.path.isfile(os.path.join(load, "metadata.json")):
        return load
    if iteration is None:
        tracker = os.path.join(load, TRACKER_FILE)
        if not os.path.isfile(tracker):
            raise CheckpointError(
                f"{load}: unknown checkpoint layout: no {TRACKER_FILE} and no dist_checkpointing metadata.json "
                "(expected a --save directory of pretrain_anchor.py or one of its iter_XXXXXXX folders)")
        with open(tracker, encoding="utf-8") as fh:
            text = fh.read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
        iteration = int(text)
    ckpt = os.path.join(load, f"iter_{iteration:07d}")
    if not os.path.isfile(os.path.join(ckpt, "metadata.json")):
        raise CheckpointError(f"{ckpt}: unknown checkpoint layout: not a finished megatron dist_checkpointing "
                              "directory (metadata.json missing)")
    return ckpt


def check_checkpoint_files(ckpt: str) -> None:
    """Refuse a damaged or incomplete checkpoint before anything in it is unpickled (files, recorded sizes)."""
    from megatron_anchor.training.checkpoint_files import problems

    found = problems(ckpt)
    if found:
        raise CheckpointError(f"{ckpt}: the checkpoint is damaged or incomplete:\n  " + "\n  ".join(found))


@contextlib.contextmanager
def megatron_session(seed: int = 1234) -> Iterator[None]:
    """A one-process gloo group and megatron's parallel state for the duration of the block.

    Only what this block created is torn down, so it nests inside a process that already runs a group.
    The environment (MASTER_PORT, RANK, ...) is left untouched, and nothing listens on the network: the group's
    store lives in this process.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_anchor import cpu_compat
    from megatron_anchor.training.initialize import init_single_process_group

    created_group = not dist.is_initialized()
    if created_group:
        init_single_process_group("gloo", datetime.timedelta(minutes=5))
    cpu_compat.activate()
    created_state = not parallel_state.model_parallel_is_initialized()
    if created_state:
        parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    cpu_compat.seed_model_parallel_rng(seed)
    try:
        yield
    finally:
        if created_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()


@dataclass
class LoadedCheckpoint:
    """A checkpoint read into one process."""

    cfg: AnchorConfig
    """The single-process config the model was built with."""
    path: str
    """The ``iter_XXXXXXX`` directory that was read."""
    state_dict: Dict[str, torch.Tensor]
    """Full (unsharded) float32 tensors in megatron's parameter names."""
    vocab_size: int
    """The tokenizer's vocabulary size (the embedding holds the padded size)."""
    saved_layout: Dict[str, int]
    """The TP/PP/DP layout the checkpoint was saved under."""
    megatron_model: Optional[torch.nn.Module] = None
    """The GPTModel itself, kept only when asked (it needs the megatron session to run)."""


def load_megatron_model(cfg: AnchorConfig, load: str, vocab_size: int, iteration: Optional[int] = None,
                        keep_model: bool = False) -> LoadedCheckpoint:
    """Read the checkpoint under ``load`` into a TP=1/PP=1 GPTModel (inside :func:`megatron_session`).

    Errors name the cause: a missing directory, an unknown layout, or model flags that do not match the
    saved tensors (the message lists the mismatched shapes and says which flags to check).
    """
    from megatron.core import dist_checkpointing

    from megatron_anchor.training.model import model_provider

    ckpt = resolve_checkpoint(load, iteration)
    check_checkpoint_files(ckpt)
    try:
        common = dist_checkpointing.load_common_state_dict(ckpt)
    except _UNREADABLE as exc:  # torch raises many kinds for unreadable files
        raise CheckpointError(f"{ckpt}: unknown checkpoint layout: cannot read its common state "
                              f"({describe_read_error(exc)})") from None
    if not isinstance(common, dict) or "layout" not in common:
        raise CheckpointError(f"{ckpt}: unknown checkpoint layout: no 'layout' record (not written by "
                              "pretrain_anchor.py)")
    model = model_provider(cfg, vocab_size)
    model.eval()
    sharded = {"model": model.sharded_state_dict()}
    _check_shapes(ckpt, sharded["model"])
    try:
        state = dist_checkpointing.load(sharded, ckpt)
    except _UNREADABLE as exc:
        raise CheckpointError(f"{ckpt}: loading failed ({describe_read_error(exc)}); check the model flags "
                              "against the run that saved it") from None
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise CheckpointError(f"{ckpt}: tensors missing from the checkpoint: {missing[:6]}")
    full = {k: v.detach().float().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    return LoadedCheckpoint(cfg=cfg, path=ckpt, state_dict=full, vocab_size=vocab_size,
                            saved_layout=dict(common["layout"]), megatron_model=model if keep_model else None)


def _check_shapes(ckpt: str, sharded: dict) -> None:
    """Compare the model's expected global shapes with the saved ones, for an error that names the flags."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    try:
        saved = dist_checkpointing.load_tensors_metadata(ckpt)
    except _UNREADABLE as exc:
        raise CheckpointError(f"{ckpt}: unknown checkpoint layout: unreadable tensor metadata "
                              f"({describe_read_error(exc)})") from None
    problems: List[str] = []
    for sh in sharded.values():
        if not isinstance(sh, ShardedTensor):
            continue
        if sh.key not in saved:
            problems.append(f"{sh.key}: not in the checkpoint")
        elif tuple(saved[sh.key].global_shape) != tuple(sh.global_shape):
            problems.append(f"{sh.key}: saved {tuple(saved[sh.key].global_shape)}, flags give {tuple(sh.global_shape)}")
    if problems:
        raise CheckpointError(
            f"{ckpt}: the model flags do not match the saved model (pass the training run's --config or its "
            "--num-layers/--hidden-size/--num-attention-heads/--ffn-hidden-size/--swiglu/... flags):\n  "
            + "\n  ".join(sorted(set(problems))[:12]))


def checkpoint_config(model_args: Sequence[str], load: Optional[str] = None):
    """``(config, checkpoint directory)`` for an inference load: the config from :func:`config_from_args`,
    the directory from ``load`` or the flags' ``--load``."""
    cfg = config_from_args(model_args, load)
    load = load or cfg.checkpoint.load
    if not load:
        raise CheckpointError("no checkpoint given (--load DIR)")
    return cfg, load


def check_tokenizer_record(load: str, tokenizer, tokenizer_type: str, allow_missing: bool = False) -> None:
    """Refuse a tokenizer whose ids differ from the one the checkpoint was trained with.

    Reads ``tokenizer_record.json`` that the trainer writes into every ``--save`` directory (``load`` or the
    directory above an ``iter_*`` folder). Another model file, end-of-document token (``--eod-token``), delimiter
    ids or vocabulary size would otherwise sample or export on ids that mean something else, so a checkpoint
    without a record is refused too, unless ``allow_missing`` (checkpoints written before records existed: the
    tools' ``--allow-missing-tokenizer-record``)."""
    from megatron_anchor.tokenizer.record import CHECKPOINT_RECORD_FILE, read_record, record_mismatches, \
        tokenizer_record

    path = save_dir_file(load, CHECKPOINT_RECORD_FILE)
    if path is None:
        if allow_missing:
            return
        raise CheckpointError(
            f"{load}: no {CHECKPOINT_RECORD_FILE}, so nothing shows which tokenizer the model was trained with; a "
            "wrong one samples gibberish without an error. Pass the training run's tokenizer flags and "
            "--allow-missing-tokenizer-record if you are sure they are right")
    try:
        saved = read_record(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    problems = record_mismatches(saved, tokenizer_record(tokenizer, tokenizer_type))
    if problems:
        raise CheckpointError(f"{path}: the checkpoint was trained with another tokenizer: " + "; ".join(problems)
                              + " (pass the training run's --tokenizer-model and --eod-token)")


def load_decoder(cfg: AnchorConfig, load: str, iteration: Optional[int] = None, gelu_approximation: str = "none",
                 allow_missing_record: bool = False):
    """``(DecoderLM, tokenizer, LoadedCheckpoint)``: the checkpoint read into the single-process decoder.

    ``gelu_approximation`` ("none" or "tanh") is the GeLU the run was trained with: megatron's unfused MLP
    computes the erf GeLU, its fused bias-GeLU kernel and Transformer Engine the tanh approximation.
    ``allow_missing_record``: see :func:`check_tokenizer_record`."""
    from dataclasses import replace

    from megatron_anchor.inference.model import DecoderLM, ModelSpec
    from megatron_anchor.tokenizer import build_tokenizer

    from megatron_anchor.tokenizer import TokenizerError

    check_checkpoint_files(resolve_checkpoint(load, iteration))  # what the checkpoint is, before its tokenizer
    try:
        tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model, eod_token=cfg.data.eod_token)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from None
    check_tokenizer_record(load, tok, cfg.data.tokenizer_type, allow_missing=allow_missing_record)
    with megatron_session(cfg.training.seed):
        loaded = load_megatron_model(cfg, load, tok.vocab_size, iteration)
    spec = replace(ModelSpec.from_anchor_config(cfg, loaded.state_dict["embedding.word_embeddings.weight"].shape[0]),
                   gelu_approximation=gelu_approximation)
    return DecoderLM.from_megatron_state(loaded.state_dict, spec), tok, loaded
