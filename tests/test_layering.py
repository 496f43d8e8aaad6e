"""Imports flow one way (STYLE.md rule 1), checked on each file's module-level imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "excise"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
# Which excise packages each package may import.
# Top-level helpers (standard library only) every package may use.
_HELPERS = ("excise.errors", "excise.provenance", "excise.fsutil")
EXCISE_ALLOWED = {
    "pem": ("excise.pem", *_HELPERS),
    "models": ("excise.models", *_HELPERS),
    "data": ("excise.data", "excise.models", *_HELPERS),
    "train": ("excise.train", "excise.data", "excise.models", "excise.pem", *_HELPERS),
    "evaluate": ("excise.evaluate", "excise.data", "excise.models", *_HELPERS),
}
# pem/ is tensors only, and numpy replaces torch there (excise/pem/delta.py says why).
THIRD_PARTY_ALLOWED = {"pem": ("numpy", "safetensors", "xxhash")}


def _module_level_imports(file: Path) -> list[str]:
    names = []
    for node in ast.parse(file.read_text()).body:  # imports inside functions are lazy on purpose
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package", sorted(EXCISE_ALLOWED))
def test_package_imports_only_what_it_may(package):
    for file in sorted((ROOT / package).rglob("*.py")):
        for name in _module_level_imports(file):
            where = f"{file.relative_to(ROOT.parent)} imports {name}"
            if name.split(".")[0] in STDLIB:
                continue
            if name == "excise" or name.startswith("excise."):
                assert name == "excise" or _within(name, EXCISE_ALLOWED[package]), where
            elif package in THIRD_PARTY_ALLOWED:
                assert _within(name, THIRD_PARTY_ALLOWED[package]), where


def _module_name(file: Path) -> str:
    parts = file.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_imports(file: Path, modules: set[str]) -> set[str]:
    """The excise modules ``file`` imports anywhere, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
                break
    return found


def test_no_import_cycle_even_through_lazy_imports():
    """A lazy import only hides a cycle (judges/hf.py and registry.py once imported each other).

    A module importing its own package (its ``__init__``) is not counted.
    """
    files = {_module_name(f): f for f in ROOT.rglob("*.py")}
    graph = {
        name: {d for d in _all_imports(f, set(files)) if d != name and not name.startswith(d + ".")}
        for name, f in files.items()
    }
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
