"""Imports flow one way (docs/ARCHITECTURE.md, "What may import what"): no library package imports an entry
point, and each imports only the packages below it in the table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

SRC = PROJECT_ROOT / "src"
# The commands users run (`python -m src.<name>`); `src.data.check` is the data doctor's.
ENTRY_POINTS = {"src.run", "src.predict", "src.bench", "src.params", "src.results", "src.checkpoints",
                "src.convert_official", "src.demo", "src.methods", "src.data.check"}
ENTRY_PACKAGES = {"demo"}  # a command in several modules (`python -m src.demo`)
# The shared basics every package may use.
BASICS = {"src.errors", "src.config", "src.quirks", "src.progress"}
# Each library package and the other packages it may import (besides the basics).
ALLOWED = {
    "models": set(),
    "data": set(),
    "analysis": set(),
    "storage": {"src.data", "src.models"},
    "training": {"src.data", "src.models", "src.storage"},
    "pretraining": {"src.data", "src.models", "src.storage", "src.training"},
}


def imported_modules(path: Path) -> set[str]:
    """Every `src.` module a file imports, function-local imports included (`from a import b` gives a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("src.")}


def module_name(path: Path) -> str:
    return path.relative_to(PROJECT_ROOT).with_suffix("").as_posix().replace("/", ".")


def top(module: str) -> str:
    """`src.training.lit` -> `src.training`; `src.errors` -> `src.errors`."""
    return ".".join(module.split(".")[:2])


def test_every_top_level_module_is_an_entry_point_or_a_basic():
    modules = {module_name(p) for p in SRC.glob("*.py")} - {"src.__init__"}
    assert modules <= ENTRY_POINTS | BASICS, f"unplaced modules: {sorted(modules - ENTRY_POINTS - BASICS)}"
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED) | ENTRY_PACKAGES, "every package has a row in ALLOWED (and docs/ARCHITECTURE.md)"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_libraries_import_only_the_packages_below_them(package: str):
    allowed = {f"src.{package}"} | ALLOWED[package] | BASICS
    for path in sorted((SRC / package).rglob("*.py")):
        if module_name(path) in ENTRY_POINTS:
            continue
        bad = {m for m in imported_modules(path)
               if m != "src" and top(m) not in allowed or m in ENTRY_POINTS or top(m) in ENTRY_POINTS}
        assert not bad, f"{path.relative_to(PROJECT_ROOT)} imports {sorted(bad)}"


def test_basics_import_only_basics():
    for name in sorted(BASICS):
        path = SRC / f"{name.split('.')[1]}.py"
        bad = {m for m in imported_modules(path) if top(m) not in BASICS}
        assert not bad, f"{path.relative_to(PROJECT_ROOT)} imports {sorted(bad)}"
