"""The package's import structure: no files that import each other in a loop, every module imports, and every
``from megatron_anchor... import NAME`` (in the package, tools, benchmarks and tests) names something that exists.

The import graph is read with ``ast`` from the source (nothing of the package runs for it): every ``import`` and
``from ... import`` anywhere in a file counts, inside functions and ``if TYPE_CHECKING:`` blocks too, because a
deferred import is still a dependency and a loop hidden inside a function is still a loop. Relative imports are
resolved against the importing file's package. An edge goes to the module a statement names, or to the
submodule when ``from package import name`` names one; the parent packages that Python also runs are not edges
(``pkg/__init__.py`` re-exporting its own modules is not a loop).

Time grows with the package's source (one parse per file, one Tarjan pass) plus one subprocess that imports every
module (a few seconds, most of it torch and megatron-core).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Optional, Set, Tuple

from tests.paths import REPO_DIR as ROOT

PACKAGE = "megatron_anchor"

OPTIONAL_EXTRAS = ("transformer_engine", "apex", "vllm", "ray")
"""Top-level modules of optional extras: a module whose import fails because one of these is missing is skipped,
not failed (the ImportError's ``name`` says which module was missing)."""

ALLOWED_LOOPS: List[FrozenSet[str]] = []
"""Import loops that are known and tolerated for now; any other loop fails the test."""


def package_modules(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` statement in ``module`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]  # a plain module's level 1 is its package
    if node.level - 1 > len(parts):
        raise ValueError(f"{module}: relative import beyond the top-level package (line {node.lineno})")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imports_of(path: Path, module: Optional[str], modules: Dict[str, Path]) -> Iterator[Tuple[str, str, int]]:
    """``(target module, name or "", line)`` for every import in ``path`` of a package module.

    ``module`` is the file's dotted name (None outside the package: relative imports are then not resolved).
    ``name`` is set for ``from M import name`` where ``M.name`` is not itself a module; the target is then ``M``.
    """
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level and module is None:
                continue
            base = _from_base(module or "", is_package, node)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    yield sub, "", node.lineno
                else:
                    yield base, "" if alias.name == "*" else alias.name, node.lineno


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (anywhere in the file)."""
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, _, _ in imports_of(path, module, modules):
            if target in modules and target != module:
                graph[module].add(target)
    return graph


def import_loops(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    loops: List[List[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    loops.append(sorted(component))
    return loops


def _describe(loop: List[str], graph: Dict[str, Set[str]]) -> str:
    edges = [f"    {a} -> {b}" for a in loop for b in sorted(graph[a]) if b in loop]
    return "  " + ", ".join(loop) + "\n" + "\n".join(edges)


def test_tarjan_finds_loops_and_only_loops():
    """The loop finder on a made-up graph: a 3-loop, a 2-loop, a self-import and a chain."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"g"}, "h": {"a"}}
    assert sorted(import_loops(graph)) == [["a", "b", "c"], ["e", "f"]]


def test_relative_imports_resolve_against_the_package(tmp_path):
    """``from . import x``, ``from ..y import z`` and imports inside functions are edges of the graph."""
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "top.py").write_text("def f():\n    from .sub import a\n")
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from ..top import f\nfrom .b import thing\n")
    (pkg / "b.py").write_text("import megatron_anchor.sub.a\nthing = 1\n")
    modules = package_modules(tmp_path)
    graph = import_graph(modules)
    assert graph[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.a"}
    assert graph[f"{PACKAGE}.top"] == {f"{PACKAGE}.sub.a"}
    assert graph[f"{PACKAGE}.sub.a"] == {f"{PACKAGE}.top", f"{PACKAGE}.sub.b"}
    # sub.a <-> sub.b, and top -> sub.a -> top through the deferred import: one loop of three
    assert import_loops(graph) == [[f"{PACKAGE}.sub.a", f"{PACKAGE}.sub.b", f"{PACKAGE}.top"]]


def test_no_import_loops_between_files():
    """No files of the package import each other in a loop, but for the entries of ALLOWED_LOOPS."""
    graph = import_graph(package_modules())
    loops = import_loops(graph)
    new = [loop for loop in loops if not any(set(loop) <= allowed for allowed in ALLOWED_LOOPS)]
    assert not new, "files that import each other in a loop (move what they share into a module both import):\n" \
        + "\n".join(_describe(loop, graph) for loop in new)
    stale = [sorted(allowed) for allowed in ALLOWED_LOOPS if not any(set(loop) & allowed for loop in loops)]
    assert not stale, f"ALLOWED_LOOPS entries that match no loop any more (delete them): {stale}"


_IMPORT_ALL = r"""
import importlib, json, sys, traceback
extras, names = set(sys.argv[1].split(",")), json.loads(sys.stdin.read())
report = {"failed": {}, "skipped": {}, "missing": []}
for module in names["modules"]:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] in extras:
            report["skipped"][module] = exc.name
        else:
            report["failed"][module] = traceback.format_exc()
    except BaseException:
        report["failed"][module] = traceback.format_exc()
for where, module, name in names["names"]:
    mod = sys.modules.get(module)
    if mod is not None and not hasattr(mod, name):
        report["missing"].append(f"{where}: {module} has no {name!r}")
print(json.dumps(report))
"""


def _import_statements() -> Iterator[Tuple[str, str, str]]:
    """``(file:line, module, name)`` for every ``from megatron_anchor.M import name`` of a non-module name, in the
    package, tools/, benchmarks/, tests/ and the top-level scripts."""
    modules = package_modules()
    files = [(path, module) for module, path in modules.items()]
    for folder in ("tools", "benchmarks", "tests"):
        files += [(path, None) for path in sorted((ROOT / folder).rglob("*.py"))]
    files += [(path, None) for path in sorted(ROOT.glob("*.py"))]
    for path, module in files:
        for target, name, line in imports_of(path, module, modules):
            yield f"{path.relative_to(ROOT)}:{line}", target, name


def test_every_module_imports_and_every_imported_name_exists():
    """Each module of the package imports in a fresh interpreter (modules that need a missing optional extra
    are skipped), and every package module and name that the code imports exists, deferred imports included."""
    modules = package_modules()
    statements = list(_import_statements())
    unknown = sorted({f"{where}: no module {target}" for where, target, _ in statements if target not in modules})
    assert not unknown, "imports of package modules that do not exist:\n" + "\n".join(unknown)
    payload = json.dumps({"modules": sorted(modules), "names": [s for s in statements if s[2]]})
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, ",".join(OPTIONAL_EXTRAS)], input=payload,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["failed"], "modules that fail to import:\n" + "\n".join(
        f"{m}:\n{tb}" for m, tb in report["failed"].items())
    assert not report["missing"], "imported names that do not exist:\n" + "\n".join(report["missing"])
    assert len(report["skipped"]) < len(modules), report["skipped"]


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def architecture_floors(text: str) -> Dict[str, int]:
    """Package folder -> floor, from the layer table of docs/architecture.md (``| 2 | `annotation/` | ... |``);
    the foundation row (``megatron_anchor/*.py``) is the key ``""``: the package's top-level modules."""
    floors = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit() and cells[1].startswith("`") and cells[1].endswith("`"):
            name = cells[1].strip("`")
            floors["" if name == f"{PACKAGE}/*.py" else name.rstrip("/")] = int(cells[0])
    return floors


def folder_of(module: str) -> str:
    """The package folder a module belongs to ("" for the package's top-level modules)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / PACKAGE / parts[1]).is_dir()) else ""


def test_folders_import_only_from_lower_floors():
    """The layer table of docs/architecture.md holds: every package folder is in it, and every import between two
    folders goes down (the foundation's modules import only each other)."""
    floors = architecture_floors(ARCHITECTURE.read_text(encoding="utf-8"))
    folders = {p.name for p in (ROOT / PACKAGE).iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted(folders - set(floors))
    assert not missing, f"package folders missing from the layer table of {ARCHITECTURE}: {missing}"
    stale = sorted(set(floors) - folders - {""})
    assert not stale, f"{ARCHITECTURE} lists folders that do not exist: {stale}"
    graph = import_graph(package_modules())
    wrong = []
    for module, targets in sorted(graph.items()):
        a = folder_of(module)
        for target in sorted(targets):
            b = folder_of(target)
            if a != b and floors[b] >= floors[a]:
                wrong.append(f"  {module} (floor {floors[a]}) imports {target} (floor {floors[b]})")
    assert not wrong, f"imports that do not go down the layers of {ARCHITECTURE}:\n" + "\n".join(wrong)


def test_the_architecture_page_names_files_that_exist():
    """Every ``megatron_anchor/...`` path the page names in backticks exists (placeholders in capitals aside)."""
    import re

    text = ARCHITECTURE.read_text(encoding="utf-8")
    named = set(re.findall(r"`(megatron_anchor/[a-z0-9_/]+(?:\.py)?)`", text))
    assert len(named) >= 5
    gone = sorted(p for p in named if not (ROOT / p).exists())
    assert not gone, f"{ARCHITECTURE} names files that do not exist: {gone}"


def test_layer_check_catches_an_upward_import():
    """The floors read from a made-up table put a lower folder importing a higher one in the wrong."""
    floors = architecture_floors("| floor | folder | x |\n|---|---|---|\n| 1 | `megatron_anchor/*.py` | f |\n"
                                 "| 2 | `annotation/` | a |\n| 9 | `eval/` | e |\n")
    assert floors == {"": 1, "annotation": 2, "eval": 9}
    assert folder_of("megatron_anchor.annotation.distilled.model") == "annotation"
    assert folder_of("megatron_anchor.bounds") == ""
    assert floors[folder_of("megatron_anchor.eval.metrics")] > floors[folder_of("megatron_anchor.annotation.format")]
