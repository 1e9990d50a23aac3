"""A user's own code joins the suite through the `plugins` list of their own config: each entry is a module
imported at startup, which registers what it defines (`register_method`, `register_benchmark`).

Only the config the user composed names plugins (the command line, their config files); a checkpoint's
stored config never does, so a checkpoint can only name methods already registered (src/trust.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from src.errors import ConfigError


def import_plugins(cfg: Mapping[str, Any]) -> None:
    """Import every module `cfg.plugins` names (a ConfigError naming the one that cannot be imported)."""
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
