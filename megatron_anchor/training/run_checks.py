"""Checks of a run's files that need no process group: where it writes, and the checkpoint it loads.

Run by :func:`megatron_anchor.training.loop.preflight` identically on every rank, so a run that would fail only
at its first save (an unwritable ``--save``) or deep inside torch (a truncated checkpoint) fails in seconds, with
a :class:`~megatron_anchor.training.config_io.ConfigError` naming the flag and the file.
"""

from __future__ import annotations

import os

from megatron_anchor.training.checkpoint_files import TRACKER_FILE
from megatron_anchor.training.config_io import ConfigError
from megatron_anchor.training.config import AnchorConfig


def output_folders(cfg: AnchorConfig):
    """``(flag, folder)`` of every folder the run writes into."""
    c, lg, d = cfg.checkpoint, cfg.logging, cfg.data
    return [(flag, path) for flag, path in (("--save", c.save), ("--tensorboard-dir", lg.tensorboard_dir),
                                            ("--wandb-save-dir", lg.wandb_save_dir), ("--profile-dir", lg.profile_dir),
                                            ("--data-cache-path", d.data_cache_path)) if path]


def check_run_files(cfg: AnchorConfig) -> None:
    """Every output folder can be created and written; a ``--load`` checkpoint holds the files it must, at the
    sizes its save recorded (:mod:`megatron_anchor.training.checkpoint_files`), before anything is unpickled."""
    from megatron_anchor.outputs import OutputError, check_writable
    from megatron_anchor.training import checkpoint_files

    for flag, path in output_folders(cfg):
        try:
            check_writable(path, flag, folder=True)
        except OutputError as exc:
            raise ConfigError(str(exc)) from None
    load = cfg.checkpoint.load
    if not load:
        return
    # A --load folder without a checkpoint yet starts from scratch (a first run that saves there); --finetune
    # needs one, except in a dry run of a recipe whose earlier step writes it.
    if os.path.exists(load) and not os.path.isdir(load):
        raise ConfigError(f"--load {load} is a file; give the --save folder of a run")
    if cfg.checkpoint.finetune and not cfg.training.dry_run and not os.path.isfile(os.path.join(load, TRACKER_FILE)):
        raise ConfigError(f"--finetune: no checkpoint under --load {load} ({TRACKER_FILE} missing)")
    found = checkpoint_files.latest_problems(load, TRACKER_FILE)
    if found:
        raise ConfigError(f"--load {load}: the checkpoint is damaged or incomplete:\n    " + "\n    ".join(found))
