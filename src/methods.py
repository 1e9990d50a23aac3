"""The PEFT methods the suite's configs define and what each declares about itself:
`python -m src.methods` lists them, `python -m src.methods --markdown` prints the README's method table.

A method is a config file, `conf/peft/<name>.yaml`, that builds a registered method class
(src/models/peft/registry.py). Its facts come from the method it builds (what it trains, how it starts,
whether it needs the CLIP prior) and from the file (its rank, the config it varies, its leading comment),
so that the tests' method matrix, the bench's default methods and the README table follow the files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.utils import instantiate

from src.config import METHOD_DIR, compose, method_names
from src.errors import reported_errors
from src.models.peft.registry import PARTS, NoOpStart, Part

PART_WORDS: dict[Part, str] = {
    "vision_layers": "modules in vision layers", "text_layers": "modules in text layers",
    "text_merge": "text-prior merge", "vision_weights": "vision weights", "text_weights": "text weights",
}
START_WORDS: dict[NoOpStart, str] = {"exact": "exact no-op", "rounding": "no-op up to float rounding",
                                     "no": "not a no-op"}


@dataclass(frozen=True)
class MethodFacts:
    """One method config: its names, what it declares, its rank and what its file says it is."""

    name: str  # the config's name (peft=<name>)
    method: str  # the registered method it builds
    varies: str | None  # the method config it extends (dora: lora), None for none
    trains: frozenset[Part]
    no_op_start: NoOpStart
    uses_prior: bool
    rank: int | None
    about: str  # the file's leading comment, as one line


def varies(name: str) -> str | None:
    """The method config `name` extends (the first entry of its defaults list), None for none."""
    defaults = (yaml.safe_load((METHOD_DIR / f"{name}.yaml").read_text()) or {}).get("defaults") or []
    return next((str(d) for d in defaults if d != "_self_"), None)


def base_method_names() -> list[str]:
    """The method configs that extend no other: one of each kind (the bench's default methods)."""
    return [name for name in method_names() if varies(name) is None]


def leading_comment(path: Path) -> str:
    """The comment lines a config file starts with, as one line."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def facts(name: str) -> MethodFacts:
    """What the method config `name` declares, from the method it builds and from its file."""
    cfg = compose([f"peft={name}"])
    method = instantiate(cfg.peft)
    return MethodFacts(
        name=cfg.peft.name, method=cfg.peft.method, varies=varies(name), trains=frozenset(method.trains),
        no_op_start=method.no_op_start, uses_prior=method.uses_prior, rank=cfg.peft.get("rank"),
        about=leading_comment(METHOD_DIR / f"{name}.yaml"),
    )


def markdown(methods: Sequence[MethodFacts]) -> str:
    """The README's method table."""
    lines = ["| `peft=` | builds | trains in the backbones | `rank` | starts as (clean mode) | what it is |",
             "|---|---|---|---:|---|---|"]
    for m in methods:
        trains = ", ".join(PART_WORDS[p] for p in PARTS if p in m.trains) or "nothing (the head only)"
        rank = "-" if m.rank is None else str(m.rank)
        lines.append(f"| `{m.name}` | `{m.method}` | {trains} | {rank} | {START_WORDS[m.no_op_start]} | {m.about} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per method config, or with --markdown the README's table."""
    parser = argparse.ArgumentParser(prog="python -m src.methods", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the README's method table")
    args = parser.parse_args(argv)
    methods = [facts(name) for name in method_names()]
    if args.markdown:
        print(markdown(methods))
        return 0
    for m in methods:
        print(f"{m.name}: builds {m.method}{f' (varies {m.varies})' if m.varies else ''}; trains "
              f"{', '.join(p for p in PARTS if p in m.trains) or 'nothing'}; rank {m.rank}; starts as {m.no_op_start}"
              f"{'; uses the CLIP prior' if m.uses_prior else ''}")
    return 0


if __name__ == "__main__":
    with reported_errors():
        sys.exit(main())
