"""PEFT methods by name: a method class registers itself (`@register_method("mapper")`), and every
`conf/peft/<name>.yaml` builds one through `build_method`, the one `_target_` a method config names
(`METHOD_BUILDER` in src/config.py).

A method config stores two names: `name`, the configuration's own (`lora`, `mapper_no_dypa`: run names,
results lines, checkpoints), and `method`, the registered class it builds (`peft_library`, `mapper`).
A stored config may only name a registered method (src/storage/trust.py): the suite's own (every module of
this package, imported on first lookup) and those of the modules in the user's `plugins` (src/config.py).
Checkpoints written before the registry named the class itself (`LEGACY_METHOD_TARGETS` in src/config.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from src.config import LEGACY_METHOD_TARGETS, METHOD_BUILDER
from src.errors import ConfigError

if TYPE_CHECKING:
    from src.models.peft.base import PeftMethod

PACKAGE = "src.models.peft"

# The parts of the grounder a method may train (`PeftMethod.trains`): modules it adds inside the chosen
# layers of a backbone, a module merging the prior into the text features, a backbone's own weights.
Part = Literal["vision_layers", "text_layers", "text_merge", "vision_weights", "text_weights"]
PARTS: tuple[Part, ...] = ("vision_layers", "text_layers", "text_merge", "vision_weights", "text_weights")
# How the grounder's backbone outputs start with the method injected, against the plain frozen backbones
# (`PeftMethod.no_op_start`): bit-identical, equal up to float rounding, or changed.
NoOpStart = Literal["exact", "rounding", "no"]

Method = TypeVar("Method", bound=type)
_METHODS: dict[str, type[PeftMethod]] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Class decorator: `method: <name>` in a method config builds this class."""

    def register(cls: Method) -> Method:
        taken = _METHODS.get(name)
        if taken is not None and _path(taken) != _path(cls):
            raise ConfigError(f"PEFT method name {name!r} is registered twice: {_path(taken)} and {_path(cls)}")
        _METHODS[name] = cls
        return cls

    return register


def registered_methods() -> dict[str, type[PeftMethod]]:
    """Every registered method by name: the suite's own and those of the plugins imported so far."""
    _import_suite_methods()
    return dict(_METHODS)


@cache
def _import_suite_methods() -> None:
    """Import every module of this package once: a module registers its methods when imported."""
    for module in pkgutil.iter_modules(importlib.import_module(PACKAGE).__path__):
        importlib.import_module(f"{PACKAGE}.{module.name}")


def method_class(method: str) -> type[PeftMethod]:
    """The class registered as `method`; a ConfigError listing the registered names when there is none."""
    methods = registered_methods()
    if method not in methods:
        raise ConfigError(
            f"peft.method={method!r} is not a registered PEFT method; registered: {', '.join(sorted(methods))}. "
            "A method of your own registers when its module is in `plugins` (plugins=[mypkg.methods])"
        )
    return methods[method]


def settings_of(cls: type[PeftMethod]) -> list[str]:
    """The settings a method class takes: its dataclass fields (none for a plain class)."""
    return [f.name for f in fields(cls)] if is_dataclass(cls) else []


def build_method(method: str, name: str, **settings: Any) -> PeftMethod:
    """The method config `name` built: the class registered as `method` with the config's other keys."""
    cls = method_class(method)
    known = settings_of(cls)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(
            f"peft.{unknown[0]}: peft={name} builds method {method!r}, which has no setting {unknown[0]!r}; "
            f"its settings: {', '.join(known) or 'none'}"
        )
    return cls(**settings)


def current_form(config: Any, choice: str | None) -> Any:
    """A stored method config in today's form: one written before the registry (`_target_` a class of
    `LEGACY_METHOD_TARGETS`) builds that class's registered method, named `choice` (the `peft=` it was trained
    with, when the checkpoint records it) or after the method; any other as it is."""
    if not isinstance(config, Mapping) or config.get("_target_") not in LEGACY_METHOD_TARGETS:
        return config
    method = LEGACY_METHOD_TARGETS[config["_target_"]]
    settings = {k: v for k, v in config.items() if k != "_target_"}
    return {"_target_": METHOD_BUILDER, "name": choice or method, "method": method, **settings}


def _path(cls: type) -> str:
    """Where a class is defined, `module.QualName`: the same class imported twice registers once."""
    return f"{cls.__module__}.{cls.__qualname__}"
