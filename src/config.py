"""Composing the suite's Hydra configuration outside `src.run` (CLIs, tests, notebooks)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from src.errors import ConfigError
from src.plugins import import_plugins

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The run configuration with `overrides` applied, as `python -m src.run` would see it: its `plugins`
    imported (they register their methods and benchmarks)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)
    import_plugins(cfg)
    return cfg


def checked_fields(cls: type, config: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """`config` as a plain dict for the dataclass `cls`, refusing keys it has no field for."""
    config = dict(config or {})
    unknown = set(config) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"unknown {what} settings {sorted(unknown)}")
    return config


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; any other name as given (`cpu`, `cuda`, `cuda:1`)."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
