"""What a finished checkpoint directory must hold, checked before any of it is unpickled.

Loading a dist_checkpointing directory unpickles its ``.metadata`` and ``common.pt`` (and objects inside the
``.distcp`` files): a crafted checkpoint runs code in the loading process, so checkpoints are trusted input (see
docs/trainer.md, "Trusted inputs"). What can be checked without unpickling is checked first, so a damaged or
half-copied checkpoint gets an error that names the file instead of a deep exception from torch:

- the files every checkpoint has (``metadata.json``, ``.metadata``, at least one ``.distcp``) exist and are not
  empty, and ``metadata.json`` is JSON (``common.pt`` is not among them: megatron-core up to 0.16 writes the
  common state there, 0.19 keeps it inside the ``torch_dist`` files; the manifest checks it where it was written);
- every file listed in the manifest (:data:`MANIFEST`, written by the trainer at each save with every file's size)
  exists with exactly that size: a truncated or partly copied ``.distcp`` is caught here.

Cost: one ``stat`` per file and one small JSON read; nothing of the tensors is read.
"""

from __future__ import annotations

import json
import os
from typing import List

TRACKER_FILE = "latest_checkpointed_iteration.txt"
"""Names the latest finished checkpoint under a --save folder; written last, atomically, once every rank finished."""

RUN_CONFIG_FILE = "run_config.yaml"
"""The training run's configuration, written beside the tracker file at every save."""

EXIT_RECORD_FILE = "last_exit.json"
"""Written beside the tracker when a run stops early and cleanly (a signal, the time budget, --exit-interval) after
its checkpoint: what a launcher script reads to tell a clean preemption from a failure (examples/gpu/preemption.sh)."""

WEIGHTS_ONLY_KEY = "weights_only"
"""Common-state key of a checkpoint that holds model weights only (tools/import_hf.py writes them): it can start a
--finetune run, never be resumed (there is no optimizer state)."""

MANIFEST = "checkpoint_files.json"
"""Written into every ``iter_XXXXXXX`` folder after its files: ``{"version": 1, "files": {name: size}}``."""
REQUIRED = ("metadata.json", ".metadata")
"""Files a megatron-core ``torch_dist`` checkpoint always has (besides its ``.distcp`` shards), in every
megatron-core release setup.py admits (0.16.1 to 0.19)."""


def read_errors() -> tuple:
    """What reading a damaged checkpoint raises: any Exception, and torch's ``CheckpointException``, which derives
    from BaseException (so ``except Exception`` lets a truncated ``.distcp`` through as a traceback)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def describe_read_error(exc: BaseException) -> str:
    """One line for a read error: the underlying error of each failed rank of a ``CheckpointException`` (whose own
    text is a traceback per rank), else the error's type and message."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, pair in sorted(failures.items()):
            inner = pair[0] if isinstance(pair, tuple) and pair else pair
            text = str(inner).strip()
            parts.append(f"rank {rank}: {type(inner).__name__}" + (f": {text}" if text else ""))
        return "; ".join(parts)
    text = str(exc).strip()
    return type(exc).__name__ + (f": {text}" if text else "")


def write_manifest(ckpt_dir: str) -> None:
    """Record the size of every file in ``ckpt_dir`` (call once all ranks finished writing it)."""
    from megatron_anchor.outputs import write_json

    sizes = {name: os.path.getsize(os.path.join(ckpt_dir, name)) for name in sorted(os.listdir(ckpt_dir))
             if name != MANIFEST and os.path.isfile(os.path.join(ckpt_dir, name))}
    write_json(os.path.join(ckpt_dir, MANIFEST), {"version": 1, "files": sizes}, indent=1)


def problems(ckpt_dir: str) -> List[str]:
    """Why ``ckpt_dir`` is not a complete checkpoint (empty when nothing checkable is wrong)."""
    if not os.path.isdir(ckpt_dir):
        return [f"{ckpt_dir}: not a folder"]
    out = []
    for name in REQUIRED:
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            out.append(f"{path}: missing")
        elif os.path.getsize(path) == 0:
            out.append(f"{path}: empty")
    shards = [n for n in os.listdir(ckpt_dir) if n.endswith(".distcp")]
    if not shards:
        out.append(f"{ckpt_dir}: no .distcp files (the tensors)")
    out += [f"{os.path.join(ckpt_dir, n)}: empty" for n in sorted(shards)
            if os.path.getsize(os.path.join(ckpt_dir, n)) == 0]
    meta = os.path.join(ckpt_dir, "metadata.json")
    if os.path.isfile(meta) and os.path.getsize(meta):
        try:
            with open(meta, encoding="utf-8") as fh:
                if not isinstance(json.load(fh), dict):
                    raise ValueError("not a mapping")
        except (OSError, ValueError) as exc:
            out.append(f"{meta}: unreadable ({exc})")
    manifest = os.path.join(ckpt_dir, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as fh:
                sizes = json.load(fh)["files"]
            sizes = {str(k): int(v) for k, v in sizes.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return out + [f"{manifest}: unreadable ({exc})"]
        for name, size in sorted(sizes.items()):
            path = os.path.join(ckpt_dir, name)
            if os.path.basename(name) != name:
                out.append(f"{manifest}: names a file outside the checkpoint ({name!r})")
            elif not os.path.isfile(path):
                out.append(f"{path}: missing (listed in {MANIFEST})")
            elif os.path.getsize(path) != size:
                out.append(f"{path}: {os.path.getsize(path)} bytes, the save wrote {size} (truncated or replaced)")
    return out


def latest_problems(root: str, tracker_file: str) -> List[str]:
    """:func:`problems` of the checkpoint the tracker file under ``root`` names (empty when there is no tracker:
    no checkpoint yet), or why the tracker itself is unreadable."""
    tracker = os.path.join(root, tracker_file)
    if not os.path.isfile(tracker):
        return []
    try:
        with open(tracker, encoding="utf-8") as fh:
            text = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{tracker}: unreadable ({exc})"]
    if not text.isdigit():
        return [f"{tracker}: expected an iteration number, found {text[:40]!r}"]
    return problems(os.path.join(root, f"iter_{int(text):07d}"))
