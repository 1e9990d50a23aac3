"""What a stored config may make the suite do: build the suite's own classes with plain values, nothing else.

Checkpoints carry their run's config (model, PEFT method, seed, data settings) so that evaluating or
predicting needs nothing else. That config is data: before any of it is used, every `_target_` in it
must be one of the suite's own callables for that section (an explicit table, `TRUSTED_TARGETS`, kept
equal to the `_target_`s of `conf/` by a test; for `peft` also the classes checkpoints named before the
method registry, `LEGACY_METHOD_TARGETS`) or the very target the user configured at the same place (a
user's own code, trusted because the user named it, never because a checkpoint did); a method the
method builder is to build must be registered (the suite's own, or one of a module the user listed in
`plugins`, imported before: a name in a checkpoint imports nothing); every peft config class must be
one the peft library registers; values are plain JSON (no interpolations, which could read the
environment). Anything else is refused with one line naming the key, before anything it names is
imported or called.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.config import LEGACY_METHOD_TARGETS, METHOD_BUILDER
from src.errors import UnsafeFileError
from src.models.peft.library import PEFT_CONFIG_CLASSES, peft_config_name
from src.models.peft.registry import registered_methods

# Per config section, the callables the suite's own conf/ files name there.
TRUSTED_TARGETS: Mapping[str, frozenset[str]] = {
    "model": frozenset({"src.models.grounder.build_grounder"}),
    "peft": frozenset({METHOD_BUILDER}),
    "data": frozenset({"src.data.datamodule.GroundingDataModule"}),
    "loss": frozenset({"src.training.losses.GroundingLoss"}),
}

PLAIN_TYPES = (str, int, float, bool, type(None))


def check_stored_config(
    stored: Mapping[str, Any], sections: Iterable[str], configured: DictConfig | Mapping[str, Any] | None, source: str
) -> None:
    """Refuse (UnsafeFileError, one line naming the key) a stored config whose `sections` name code the
    suite does not define, or hold anything but plain values; `configured` is the user's own config."""
    configured = OmegaConf.create(dict(configured or {})) if not isinstance(configured, DictConfig) else configured
    for section in sections:
        if section in stored:
            _check_node(stored[section], section, section, configured, source)
    method = stored.get("peft")
    if "peft" in sections and isinstance(method, Mapping) and method.get("_target_") == METHOD_BUILDER:
        _check_method(method.get("method"), source)


def _check_method(name: Any, source: str) -> None:
    """The method builder builds only registered methods: a name a checkpoint gives imports nothing."""
    methods = registered_methods()
    if name not in methods:
        raise _refused(
            source, "peft.method",
            f"names {name!r}, which is not a registered PEFT method ({', '.join(sorted(methods))}): nothing was "
            "imported. If it is your own method, list its module in `plugins` (plugins=[mypkg.methods])",
        )


def _check_node(node: Any, key: str, section: str, configured: DictConfig, source: str) -> None:
    if isinstance(node, Mapping):
        for name, value in node.items():
            if not isinstance(name, str):
                raise _refused(source, key, f"has a key of type {type(name).__name__}")
            path = f"{key}.{name}"
            if name == "_target_":
                _check_target(value, path, key == section, section, configured, source)
            elif name == "config_class" and section == "peft":
                if not isinstance(value, str) or peft_config_name(value) not in PEFT_CONFIG_CLASSES:
                    raise _refused(source, path, f"names {value!r}, which is not a config class of the peft library")
            else:
                _check_node(value, path, section, configured, source)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _check_node(value, f"{key}[{i}]", section, configured, source)
    elif not isinstance(node, PLAIN_TYPES):
        raise _refused(source, key, f"holds a {type(node).__name__}, not a plain value")
    elif isinstance(node, str) and "${" in node:
        raise _refused(source, key, f"holds the interpolation {node!r}; stored settings must be plain values")


def _check_target(target: Any, path: str, top: bool, section: str, configured: DictConfig, source: str) -> None:
    """A `_target_` passes when the suite defines it for this section (or did: a method's class, before the
    registry), or the user configured it here."""
    if top and (target in TRUSTED_TARGETS.get(section, ()) or (section == "peft" and target in LEGACY_METHOD_TARGETS)):
        return
    if isinstance(target, str) and OmegaConf.select(configured, path, default=None) == target:
        return
    raise _refused(
        source, path,
        f"names `{target}`, which is not one of the suite's own classes for `{section}`: nothing it names was "
        f"imported or called. If it is your own code, configure it yourself ({section}=<your config>); "
        "a checkpoint may then name the same target",
    )


def _refused(source: str, key: str, why: str) -> UnsafeFileError:
    return UnsafeFileError(f"{source}: refused: its stored config key `{key}` {why}")
