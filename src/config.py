"""Composing the suite's Hydra configuration outside `src.run` (CLIs, tests, notebooks), the user's plugins,
and how a config names a PEFT method (today, and in checkpoints written before the method registry)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from src.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"
METHOD_DIR = CONFIG_DIR / "peft"
# The one `_target_` of every method config: it builds the registered method `peft.method`
# (src/models/peft/registry.py).
METHOD_BUILDER = "src.models.peft.registry.build_method"
# What checkpoints written before the method registry stored as `peft._target_`: each method's class, and
# the registered method it is.
LEGACY_METHOD_TARGETS: Mapping[str, str] = {
    "src.models.peft.mapper.Mapper": "mapper",
    "src.models.peft.library.LibraryPeft": "peft_library",
    "src.models.peft.bottleneck.Adapter": "adapter",
    "src.models.peft.bottleneck.AdaptFormer": "adaptformer",
    "src.models.peft.base.Frozen": "frozen",
    "src.models.peft.base.Full": "full",
}


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """The run configuration with `overrides` applied, as `python -m src.run` would see it: its `plugins`
    imported (they register their methods and benchmarks)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)
    import_plugins(cfg)
    return cfg


def method_names() -> list[str]:
    """Every method config of the suite (`conf/peft/<name>.yaml`), by name."""
    return sorted(p.stem for p in METHOD_DIR.glob("*.yaml"))


@functools.cache
def shipped_rank(method: str) -> int | None:
    """The rank the suite's method config `conf/peft/<method>.yaml` sets (or inherits); None for a method without
    one, or a name that is none of the suite's method configs (a plugin's, or one from another checkout)."""
    if method not in method_names():
        return None
    return compose([f"peft={method}"]).peft.get("rank")


def import_plugins(cfg: Mapping[str, Any]) -> None:
    """Import every module the user's `plugins` names: a user's own code joins the suite this way, each module
    registering what it defines (`register_method`, `register_benchmark`; docs/EXTENDING.md). Only the config
    the user composed names plugins, never a checkpoint's stored one. A module that cannot be imported is a
    ConfigError naming it."""
    plugins = cfg.get("plugins") or []
    if OmegaConf.is_config(plugins):
        plugins = OmegaConf.to_container(plugins)
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins must be a list of module names, e.g. plugins=[mypkg.methods]; got {plugins!r}")
    for name in plugins:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"plugins: cannot import {name!r} ({err}); put its folder on PYTHONPATH or install its package"
            ) from None


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
