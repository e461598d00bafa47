"""Wheels for a machine without a package index: downloaded where there is one, installed there from a folder.

A GPU machine often has a CUDA build of torch and nothing that can reach a package index. The project's runtime
requirements (``setup.py``'s ``install_requires``, the one list) then travel as wheels in a folder (a
*wheelhouse*):

- :func:`download` (on a machine with an index) fetches the wheels for the target interpreter (CPython 3.12,
  manylinux x86-64 by default) of every requirement and, walking each wheel's ``Requires-Dist``, of what they need
  in turn, except what the target already has (``have``) and :data:`NEVER_INSTALLED` (the machine's own torch
  stack is kept, never swapped);
- :func:`plan_install` (on the target) picks, for every requirement this interpreter does not already satisfy,
  a compatible wheel from the folder, and its unmet needs in turn; what it cannot satisfy comes back as one line
  each, so a run can stop in seconds saying why;
- :func:`install` puts the planned wheels into a separate folder (``pip install --no-index --no-deps --target``),
  which goes first on ``PYTHONPATH``: the machine's own packages stay as they are.

    python -m megatron_anchor.wheelhouse download --dest .whl          # here, with an index
    python -m megatron_anchor.wheelhouse install --wheelhouse .whl --target /tmp/site   # there, without one

Cost: one ``pip download`` call per level of the dependency tree; planning reads each wheel's METADATA once.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import glob
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from email.parser import HeaderParser
from importlib import metadata
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import sys_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEGATRON_CORE_PY312 = "0.19.2"
"""The megatron-core release downloaded for Python 3.12 machines: the newest that ``setup.py`` admits (< 0.20), and
the one the project's tests run against besides 0.16.1 (``tests/project/test_megatron_core_versions.py``)."""

NEVER_INSTALLED = ("torch", "triton", "nvidia-*", "transformer-engine*", "pip", "setuptools", "wheel")
"""Distributions never downloaded nor installed from a wheelhouse: the machine's torch and its CUDA stack are kept
as they are (another build would not match its driver), Transformer Engine is a source build (opt-in elsewhere), and
pip's own tools are the machine's."""

TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
"""Platform tags accepted for the target (pip matches each exactly): glibc >= 2.28 x86-64 and older builds."""


def target_environment(python_version: str = "3.12") -> Dict[str, str]:
    """PEP 508 marker values of a CPython ``python_version`` on Linux x86-64 (for evaluating ``Requires-Dist``)."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def install_requires(setup_py: Optional[str] = None) -> List[str]:
    """``install_requires`` of ``setup.py`` (a literal list), read without running it."""
    path = setup_py or os.path.join(REPO, "setup.py")
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return list(ast.literal_eval(node.value))
    raise ValueError(f"{path}: no literal install_requires=[...] in its setup() call")


def never_installed(name: str) -> bool:
    """Whether ``name`` matches :data:`NEVER_INSTALLED`."""
    name = canonicalize_name(name)
    return any(fnmatch.fnmatch(name, pattern) for pattern in NEVER_INSTALLED)


@dataclass
class Wheel:
    """One wheel file of a wheelhouse."""

    path: str
    name: str
    version: Version
    tags: frozenset
    requires: List[str]
    """Its ``Requires-Dist`` lines (markers included)."""


def read_wheel(path: str) -> Wheel:
    """Name, version, tags and ``Requires-Dist`` of a wheel file (its METADATA, read from the zip)."""
    name, version, _, tags = parse_wheel_filename(os.path.basename(path))
    with zipfile.ZipFile(path) as zf:
        meta = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if not meta:
            raise ValueError(f"{path}: no .dist-info/METADATA inside: not a wheel")
        headers = HeaderParser().parsestr(zf.read(meta[0]).decode("utf-8", "replace"))
    return Wheel(path=path, name=str(name), version=version, tags=frozenset(tags),
                 requires=headers.get_all("Requires-Dist") or [])


def read_wheelhouse(folder: str) -> List[Wheel]:
    """Every wheel in ``folder`` (files that are not wheels are refused, naming the file)."""
    wheels = []
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        try:
            wheels.append(read_wheel(path))
        except (InvalidWheelFilename, zipfile.BadZipFile, ValueError) as exc:
            raise ValueError(f"{path}: not a readable wheel ({exc})") from None
    return wheels


def _needed(req: Requirement, env: Dict[str, str]) -> bool:
    return req.marker is None or req.marker.evaluate(env)


def _satisfies(version, req: Requirement) -> bool:
    return version is not None and req.specifier.contains(str(version), prereleases=True)


def installed_versions() -> Dict[str, str]:
    """Canonical name -> version of every distribution this interpreter sees (``sys.path``, so ``PYTHONPATH``
    folders count)."""
    out: Dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name")
        if name:
            out.setdefault(canonicalize_name(name), dist.version)  # the first on sys.path is the one imported
    return out


@dataclass
class InstallPlan:
    """What :func:`plan_install` decided."""

    wheels: List[Wheel] = field(default_factory=list)
    """Wheels to install, one per distribution."""
    satisfied: Dict[str, str] = field(default_factory=dict)
    """Requirements already met here: name -> installed version."""
    problems: List[str] = field(default_factory=list)
    """One line per requirement that cannot be met (nothing installed when there is any)."""
    shadowed: List[str] = field(default_factory=list)
    """Installed distributions whose version does not satisfy a requirement; the wheel installed into the target
    folder goes first on the path."""

    def to_dict(self) -> Dict:
        return {"wheels": [os.path.basename(w.path) for w in self.wheels], "satisfied": self.satisfied,
                "problems": self.problems, "shadowed": self.shadowed}


def plan_install(requirements: Iterable[str], wheelhouse: Optional[str], installed: Optional[Dict[str, str]] = None,
                 tags: Optional[Set] = None) -> InstallPlan:
    """The wheels of ``wheelhouse`` that make ``requirements`` (and what those wheels need) importable here.

    ``installed`` (name -> version; default: this interpreter's) and ``tags`` (default: this interpreter's
    supported wheel tags) describe the target. Distributions in :data:`NEVER_INSTALLED` must already be there."""
    installed = installed_versions() if installed is None else {canonicalize_name(k): v for k, v in installed.items()}
    tags = set(sys_tags()) if tags is None else tags
    env = {"extra": ""}  # this interpreter's own marker values, extras off
    house = read_wheelhouse(wheelhouse) if wheelhouse and os.path.isdir(wheelhouse) else []
    plan = InstallPlan()
    chosen: Dict[str, Wheel] = {}
    queue: List[Tuple[str, str]] = [(r, "setup.py") for r in requirements]
    while queue:
        text, parent = queue.pop(0)
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            plan.problems.append(f"{parent}: cannot read the requirement {text!r} ({exc})")
            continue
        if not _needed(req, env):
            continue
        name = canonicalize_name(req.name)
        if name in chosen:
            if not _satisfies(chosen[name].version, req):
                plan.problems.append(f"{req} (needed by {parent}) conflicts with {name} {chosen[name].version}, "
                                     f"chosen for another requirement")
            continue
        have = installed.get(name)
        if _satisfies(have, req):
            plan.satisfied[name] = have
            continue
        state = f"installed as {have}, which does not satisfy it" if have else "not installed"
        if never_installed(name):
            plan.problems.append(f"{req} (needed by {parent}) is {state}; {name} is never installed here (the "
                                 f"machine's own build is kept)")
            continue
        candidates = [w for w in house if canonicalize_name(w.name) == name and _satisfies(w.version, req)
                      and w.tags & tags]
        if not candidates:
            where = f"the wheelhouse {wheelhouse} has no wheel for it that fits this Python" \
                if wheelhouse and os.path.isdir(wheelhouse) else \
                "there is no wheelhouse to install it from"
            plan.problems.append(f"{req} (needed by {parent}) is {state}, and {where} (make one with "
                                 "benchmarks/gpu_wheelhouse.sh)")
            continue
        wheel = max(candidates, key=lambda w: w.version)
        chosen[name] = wheel
        plan.wheels.append(wheel)
        if have:
            plan.shadowed.append(f"{name} {have} -> {wheel.version}")
        queue.extend((r, f"{wheel.name} {wheel.version}") for r in wheel.requires)
    return plan


def install(plan: InstallPlan, target: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    """``pip install --no-index --no-deps --target TARGET`` the planned wheels (the plan already resolved their
    needs, and ``--target`` with dependencies would reinstall what the machine has)."""
    os.makedirs(target, exist_ok=True)
    cmd = [python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--upgrade", "--target", target,
           *[w.path for w in plan.wheels]]
    return subprocess.run(cmd, capture_output=True, text=True)


def read_have(path: Optional[str]) -> Dict[str, Optional[str]]:
    """A target machine's distributions from ``pip list --format=freeze`` output or one name per line (``#``
    comments allowed): canonical name -> version (None when only the name is given)."""
    if not path:
        return {}
    out: Dict[str, Optional[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, version = line.partition("==")
            if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ValueError(f"{path}:{lineno}: expected NAME or NAME==VERSION, got {line!r}")
            out[canonicalize_name(name)] = version.strip() or None
    return out


def download_requirements(python_version: str = "3.12") -> List[str]:
    """What a wheelhouse holds for ``python_version``: ``install_requires`` with megatron-core pinned to the
    release the project tests on that Python, :data:`NEVER_INSTALLED` left out."""
    out = []
    for text in install_requires():
        req = Requirement(text)
        if never_installed(req.name):
            continue
        if canonicalize_name(req.name) == "megatron-core" and Version(python_version) >= Version("3.12"):
            if not req.specifier.contains(MEGATRON_CORE_PY312):
                raise ValueError(f"setup.py's {req} excludes {MEGATRON_CORE_PY312}: update MEGATRON_CORE_PY312")
            text = f"megatron-core=={MEGATRON_CORE_PY312}"
        out.append(text)
    return out


def download(requirements: Sequence[str], dest: str, python_version: str = "3.12",
             platforms: Sequence[str] = TARGET_PLATFORMS, have: Optional[Dict[str, Optional[str]]] = None,
             python: str = sys.executable) -> List[str]:
    """Download wheels of ``requirements`` and of everything they need (``Requires-Dist``, extras off) for CPython
    ``python_version`` on ``platforms`` into ``dest``, skipping what ``have`` already satisfies and
    :data:`NEVER_INSTALLED`. Returns the wheel files of ``dest``. Raises RuntimeError naming what pip could not
    find."""
    have = have or {}
    env = target_environment(python_version)
    os.makedirs(dest, exist_ok=True)
    base = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--python-version", python_version, "--implementation", "cp", "-d", dest]
    for platform in platforms:
        base += ["--platform", platform]
    asked: Set[str] = set()
    pending = list(requirements)
    while pending:
        todo = []
        for text in pending:
            req = Requirement(text)
            name = canonicalize_name(req.name)
            if not _needed(req, env) or never_installed(name) or str(req) in asked:
                continue
            if name in have and (have[name] is None or _satisfies(have[name], req)):
                continue
            asked.add(str(req))
            todo.append(str(req))
        if not todo:
            break
        if subprocess.run(base + todo, capture_output=True, text=True).returncode != 0:
            for text in todo:  # one call per requirement, so the failure names it
                proc = subprocess.run(base + [text], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"pip found no wheel of {text} for CPython {python_version} "
                                       f"({', '.join(platforms)}):\n{proc.stderr.strip()[-1500:]}")
        house = read_wheelhouse(dest)
        present = {canonicalize_name(w.name): w for w in house}
        pending = []
        for wheel in house:
            for text in wheel.requires:
                req = Requirement(text)
                if not _needed(req, env):
                    continue
                got = present.get(canonicalize_name(req.name))
                if got is None or not _satisfies(got.version, req):
                    pending.append(text)
    return sorted(glob.glob(os.path.join(dest, "*.whl")))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_anchor.wheelhouse", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch the wheels (needs a package index)")
    dl.add_argument("--dest", default=os.path.join(REPO, ".whl"))
    dl.add_argument("--python-version", default="3.12")
    dl.add_argument("--have", help="the target's distributions (pip list --format=freeze output, or names): "
                                   "those it already satisfies are not downloaded")
    dl.add_argument("--max-mib", type=float, default=None,
                    help="fail when the wheelhouse grows beyond this many MiB (what can travel with a checkout)")
    for name in ("plan", "install"):
        p = sub.add_parser(name, help=f"{name} from a wheelhouse what this interpreter lacks")
        p.add_argument("--wheelhouse", required=True)
        if name == "install":
            p.add_argument("--target", required=True, help="folder the wheels go into (put it on PYTHONPATH)")
    args = ap.parse_args(argv)
    if args.command == "download":
        files = download(download_requirements(args.python_version), args.dest, args.python_version,
                         have=read_have(args.have))
        size = sum(os.path.getsize(f) for f in files)
        for f in files:
            print(os.path.basename(f))
        print(f"{len(files)} wheels, {size / 2 ** 20:.1f} MiB in {args.dest}")
        if args.max_mib is not None and size > args.max_mib * 2 ** 20:
            print(f"error: {args.dest} holds {size / 2 ** 20:.1f} MiB, more than --max-mib {args.max_mib:g}: pass "
                  "--have with the target's package list to leave out what it already has", file=sys.stderr)
            return 1
        return 0
    plan = plan_install(install_requires(), args.wheelhouse)
    if args.command == "plan" or plan.problems or not plan.wheels:
        print(json.dumps(plan.to_dict(), indent=2))
        return 3 if plan.problems else 0
    proc = install(plan, args.target)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        return proc.returncode
    print(json.dumps(plan.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
