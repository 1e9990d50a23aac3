"""One bridge to the `peft` library: LoRA, DoRA, IA3, LoHa, LoKr, ... on both backbones.

The config names a peft config class and its fields, and the targets by role (`attn_qkv`, `attn_out`,
`mlp_out`, ...: src/models/roles.py), which each backbone resolves to its own module names; the bridge
builds one config per backbone whose `target_modules` is a regex over the chosen layers and those names,
and injects it with
`peft.inject_adapter_in_model` (no PeftModel wrapper: the grounder stays a plain nn.Module). Any peft
method that injects into Linear layers needs only a config file in `conf/peft/`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from peft import inject_adapter_in_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

from src.errors import ConfigError
from src.models.peft.base import PeftMethod, PeftTarget
from src.models.peft.injection import check_layers
from src.models.peft.registry import NoOpStart, Part, register_method

# Every attention projection: the ViT's fused qkv and output projection; BERT's query/key/value/output dense.
ATTENTION = ("attn_qkv", "attn_out")


@register_method("peft_library")
@dataclass
class LibraryPeft(PeftMethod):
    """A `peft` library method applied to Linear layers of chosen layers of both backbones.

    Targets are roles (src/models/roles.py), or module paths inside one layer (ViT: `attn.qkv`; BERT:
    `attention.self.query`), as older configs name them. Layer lists left null take the model's
    `adapter_layers`.
    """

    config_class: str = "peft.LoraConfig"  # a peft config class by name (`LoraConfig` or `peft.LoraConfig`)
    rank: int | None = 8  # written to the config's `rank_field`; null for rank-free methods (IA3)
    rank_field: str = "r"
    settings: dict[str, Any] = field(default_factory=dict)  # any other fields of the peft config
    vision_targets: Sequence[str] = ATTENTION
    text_targets: Sequence[str] = ATTENTION
    # Targets that are feed-forward layers (IA3 scales their input instead of their output); must be
    # among the targets. Only for config classes with a `feedforward_modules` field.
    vision_feedforward: Sequence[str] = ()
    text_feedforward: Sequence[str] = ()
    vision_layers: Sequence[int] | None = None
    text_layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        self.config_type = peft_config_class(self.config_class)
        names = {f.name for f in fields(self.config_type)}
        unknown = set(self.settings) - names
        if unknown:
            raise ConfigError(f"{self.config_class} has no fields {sorted(unknown)}")
        if self.rank is not None and self.rank_field not in names:
            raise ConfigError(f"{self.config_class} has no rank field {self.rank_field!r}; set rank=null or rank_field")
        if (self.vision_feedforward or self.text_feedforward) and "feedforward_modules" not in names:
            raise ConfigError(f"{self.config_class} has no feedforward_modules; leave *_feedforward empty")
        for targets, feedforward, which in ((self.vision_targets, self.vision_feedforward, "vision"),
                                            (self.text_targets, self.text_feedforward, "text")):
            if not set(feedforward) <= set(targets):
                raise ConfigError(f"{which}_feedforward {list(feedforward)} must be among {which}_targets")

    @property
    def trains(self) -> frozenset[Part]:
        """The layers of each backbone it has targets in."""
        return frozenset(part for part, targets in (("vision_layers", self.vision_targets),
                                                    ("text_layers", self.text_targets)) if targets)

    @property
    def no_op_start(self) -> NoOpStart:
        """peft initialises its methods as no-ops unless `init_weights` is false; DoRA's magnitude m = ||W||
        rescales W by m / ||W||, a no-op only up to float rounding."""
        if self.settings.get("init_weights", True) is False:
            return "no"
        return "rounding" if self.settings.get("use_dora") else "exact"

    def inject(self, target: PeftTarget) -> list[nn.Module]:
        tunable: list[nn.Module] = []
        for which, encoder, targets, feedforward, layers in (
            ("vision", target.vision, self.vision_targets, self.vision_feedforward, self.vision_layers),
            ("text", target.text, self.text_targets, self.text_feedforward, self.text_layers),
        ):
            if not targets:
                continue
            blocks = encoder.layers
            chosen = check_layers(self.layers_or_default(layers, target.adapter_layers, which), len(blocks), which)
            prefix = module_path(encoder, blocks)
            paths = encoder.roles.resolve(targets, blocks[0], f"peft.{which}_targets")
            kwargs: dict[str, Any] = dict(self.settings, target_modules=layer_regex(prefix, chosen, paths))
            if self.rank is not None:
                kwargs[self.rank_field] = self.rank
            if feedforward:
                feedforward_paths = encoder.roles.resolve(feedforward, blocks[0], f"peft.{which}_feedforward")
                kwargs["feedforward_modules"] = layer_regex(prefix, chosen, feedforward_paths)
            inject_adapter_in_model(self.config_type(**kwargs), encoder)
            tunable += [m for m in encoder.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        return tunable


# The peft library's own registry of its methods' config classes, by class name: a config (or a
# checkpoint's stored config) names one of these, and nothing else is ever imported.
PEFT_CONFIG_CLASSES: dict[str, type] = {cls.__name__: cls for cls in PEFT_TYPE_TO_CONFIG_MAPPING.values()}


def peft_config_name(name: str) -> str:
    """`peft.LoraConfig` or `LoraConfig` -> `LoraConfig`."""
    return name.removeprefix("peft.")


def peft_config_class(name: str) -> type:
    """The peft config class called `name` (`LoraConfig`, or `peft.LoraConfig` as the configs write it)."""
    try:
        return PEFT_CONFIG_CLASSES[peft_config_name(name)]
    except KeyError:
        raise ConfigError(
            f"peft.config_class={name!r} is not a config class of the peft library; known: "
            f"{', '.join(sorted(PEFT_CONFIG_CLASSES))}"
        ) from None


def module_path(root: nn.Module, child: nn.Module) -> str:
    """The dotted name of `child` inside `root` (e.g. `vit.blocks`)."""
    for name, module in root.named_modules():
        if module is child:
            return name
    raise ValueError("the block list is not inside its backbone")


def layer_regex(prefix: str, layers: Sequence[int], names: Sequence[str]) -> str:
    """A full-match regex for `<prefix>.<layer>.<name>` over the chosen layers and module names."""
    layer_group = "|".join(str(i) for i in layers)
    name_group = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(prefix)}\.({layer_group})\.({name_group})"
