"""Imports flow one way (STYLE.md rule 1), checked on each file's module-level imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "excise"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
# Which excise packages each package may import.
EXCISE_ALLOWED = {
    "pem": ("excise.pem", "excise.errors", "excise.provenance"),
    "models": ("excise.models", "excise.errors", "excise.provenance"),
    "data": ("excise.data", "excise.models", "excise.errors", "excise.provenance"),
    "train": (
        "excise.train",
        "excise.data",
        "excise.models",
        "excise.pem",
        "excise.errors",
        "excise.provenance",
    ),
    "evaluate": ("excise.evaluate", "excise.data", "excise.models", "excise.errors", "excise.provenance"),
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
