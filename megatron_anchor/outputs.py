"""Writing outputs safely: one atomic-write helper, and the checks every tool runs before it writes anything.

- :func:`atomic_path` / :func:`atomic_write` / :func:`write_text` / :func:`write_json`: the file is written under
  a temporary name beside its destination and renamed over it only when complete (``os.replace`` is atomic on
  one file system), so a reader, a kill or a full disk never leaves a half-written file where the old one was.
  :func:`atomic_folder` does the same for a whole folder (an export, an imported checkpoint, a fetched package).
- :func:`refuse_aliases`: an output that is the same file as one of the inputs (same path, a symbolic or hard
  link) would be emptied before it is read; tools refuse it up front.
- :func:`check_writable`: an output whose folder cannot be created or written fails now, not after hours of work.

Standard library only. Costs: one temporary file per write (the destination's size), one ``stat`` per path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterable, Iterator, Optional, Sequence, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]


class OutputError(ValueError):
    """An output that cannot be written safely (it aliases an input, or its location is not writable)."""


def temporary_name(path: PathLike, suffix: str = "") -> str:
    """The temporary sibling ``PATH.tmpPID[SUFFIX]`` that :func:`atomic_path` writes first (``suffix`` keeps an
    extension for writers that infer the format from it, e.g. ``.png``)."""
    return f"{os.fspath(path)}.tmp{os.getpid()}{suffix}"


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = "", make_dirs: bool = True) -> Iterator[str]:
    """Yield a temporary path to write ``path``'s content to; on a clean exit it is renamed over ``path``, on an
    exception (or KeyboardInterrupt) it is removed and ``path`` is left as it was."""
    path = os.fspath(path)
    if make_dirs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: Optional[str] = "utf-8", fsync: bool = False,
                 newline: Optional[str] = None) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: an open file (``mode`` "w" or "wb") whose content replaces
    ``path`` only once the block completes. ``fsync`` forces the bytes to disk before the rename (checkpoints)."""
    if "w" not in mode:
        raise ValueError(f"atomic_write writes whole files (mode 'w' or 'wb'), not {mode!r}")
    with atomic_path(path) as tmp:
        binary = "b" in mode
        with open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_folder(path: PathLike, tmp: Optional[PathLike] = None) -> Iterator[str]:
    """Yield an empty temporary folder beside ``path`` to fill; on a clean exit it takes ``path``'s place, on an
    exception (or KeyboardInterrupt) it is removed and ``path`` is left as it was.

    The swap renames an existing ``path`` aside (``TMP-replaced``), renames the new folder in, then removes the
    old one, so ``path`` is missing only between two renames. ``tmp`` names the temporary folder (a leftover of a
    killed run under that name is removed first, so a rerun cleans up after it); by default it is a fresh, unique,
    hidden name (``tempfile.mkdtemp``, made ``0o755`` like an ordinary folder), so nothing that already exists is
    ever removed on the way. Costs: two renames and the removal of the old folder (its size)."""
    final = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    if tmp is None:
        work = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
        os.chmod(work, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    else:
        work = os.fspath(tmp)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = None
    if os.path.isdir(final):
        old = work + "-replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(work, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: PathLike, text: Union[str, bytes], fsync: bool = False) -> None:
    """Replace ``path`` atomically with ``text`` (bytes are written as they are)."""
    with atomic_write(path, "wb" if isinstance(text, bytes) else "w", fsync=fsync) as f:
        f.write(text)


def write_json(path: PathLike, obj: Any, fsync: bool = False, **dump_kwargs: Any) -> None:
    """Replace ``path`` atomically with ``obj`` as JSON (``dump_kwargs`` go to ``json.dump``)."""
    with atomic_write(path, fsync=fsync) as f:
        json.dump(obj, f, **dump_kwargs)


# -- checks before writing ---------------------------------------------------------------------------------------


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: the same resolved path (symbolic links followed), or, when both exist,
    the same inode (hard links)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


Named = Tuple[str, PathLike]
"""``(flag, path)``: what a message names."""


def refuse_aliases(outputs: Iterable[Named], inputs: Iterable[Named]) -> None:
    """Raise :class:`OutputError` when an output path is one of the input files (see :func:`same_file`)."""
    inputs = [(flag, os.fspath(p)) for flag, p in inputs if p]
    for out_flag, out in outputs:
        if not out:
            continue
        for in_flag, inp in inputs:
            if same_file(out, inp):
                raise OutputError(f"{out_flag} {os.fspath(out)} is the same file as {in_flag} {inp}: writing it "
                                  "would destroy the input before it is read; choose another output")


def inside(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (resolved paths)."""
    p, f = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_writable(path: PathLike, flag: str, folder: bool = False) -> None:
    """Raise :class:`OutputError` naming ``flag`` when ``path`` cannot be written: its nearest existing parent is
    not a writable folder, or it exists as a folder where a file is wanted (or the reverse with ``folder``)."""
    path = os.fspath(path)
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise OutputError(f"{flag} {path} is a file, not a folder")
        if not folder and os.path.isdir(path):
            raise OutputError(f"{flag} {path} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{flag} {path}: {parent} is a file, so the output's folder cannot be created")
    target = path if folder and os.path.isdir(path) else parent
    if not os.access(target, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: the folder {target} is not writable")


def check_outputs(outputs: Sequence[Named], inputs: Sequence[Named] = (), folders: Sequence[Named] = ()) -> None:
    """Every output file writable and none an input; every output folder writable (:class:`OutputError`)."""
    refuse_aliases(list(outputs) + list(folders), inputs)
    for flag, path in outputs:
        if path:
            check_writable(path, flag)
    for flag, path in folders:
        if path:
            check_writable(path, flag, folder=True)


def require_input(path: PathLike, flag: str, folder: bool = False) -> None:
    """Raise :class:`FileNotFoundError` naming ``flag`` when an input file (or folder) is missing or the wrong
    kind, with a message that says which ("is a folder", not "not found")."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} not found")
    if folder and not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path} is a folder, not a file")
