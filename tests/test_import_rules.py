"""Imports flow one way (docs/ARCHITECTURE.md): src/models and src/data never import an entry point, nor
each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

ENTRY_POINTS = {"src.run", "src.predict", "src.bench", "src.params", "src.results", "src.convert_official",
                "src.checkpoints", "src.data.check"}
LIBRARIES = {"models": "src.data", "data": "src.models"}  # each library and the one it must not import


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, function-local imports included (`from a import b` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("library", sorted(LIBRARIES))
def test_libraries_never_import_entry_points_or_each_other(library: str):
    forbidden = ENTRY_POINTS | {LIBRARIES[library]}
    for path in sorted((PROJECT_ROOT / "src" / library).rglob("*.py")):
        if path.relative_to(PROJECT_ROOT).with_suffix("").as_posix().replace("/", ".") in ENTRY_POINTS:
            continue
        bad = {m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden)}
        assert not bad, f"{path.relative_to(PROJECT_ROOT)} imports {sorted(bad)}"
