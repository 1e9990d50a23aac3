"""The one mechanism every PEFT method uses: the grounder freezes its backbones, the method injects
its modules (and may unfreeze parts), and reports which modules count as tunable backbone parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from torch import nn

from src.errors import ConfigError
from src.models.peft.registry import NoOpStart, Part, register_method

if TYPE_CHECKING:
    from src.models.encoders import TextEncoder, VisionEncoder
    from src.quirks import ModelQuirks


class PeftTarget(Protocol):
    """What every PEFT method may touch: the two backbones (their layers and roles), the quirks and the
    model's default adapter layers. A method that needs more says so in its own protocol (MaPPER's)."""

    vision: VisionEncoder
    text: TextEncoder
    quirks: ModelQuirks
    adapter_layers: dict[str, Sequence[int]]


class PeftMethod:
    """Base of every method. Subclasses are dataclasses whose fields are the method's settings."""

    # Whether the grounder must build the frozen CLIP text prior for this method.
    uses_prior: bool = False
    # Whether the method leaves the backbones frozen (their dropout is then off in clean mode).
    freezes_backbones: bool = True
    # What it trains, by part of the grounder (registry.PARTS); tests check exactly these train.
    trains: frozenset[Part] = frozenset()
    # How the backbone outputs start, against the frozen backbones in clean mode (registry.NoOpStart).
    no_op_start: NoOpStart = "exact"

    def inject(self, target: PeftTarget) -> list[nn.Module]:
        """Insert the method's modules into `target`; return the modules that count as tunable backbone."""
        raise NotImplementedError

    @staticmethod
    def layers_or_default(
        layers: Sequence[int] | None, defaults: dict[str, Sequence[int]], which: str
    ) -> Sequence[int]:
        """The configured layer list, or the model's default placement for `which` backbone."""
        if layers is not None:
            return layers
        if which not in defaults:
            raise ConfigError(f"no {which} adapter layers configured and the model gives no default")
        return defaults[which]


@register_method("frozen")
class Frozen(PeftMethod):
    """Linear-probe style baseline: backbones frozen, only the fusion head trains."""

    def inject(self, target: PeftTarget) -> list[nn.Module]:
        return []


@register_method("full")
class Full(PeftMethod):
    """Full fine-tuning: every backbone parameter trains (the CLIP prior is not used)."""

    freezes_backbones = False
    trains = frozenset({"vision_weights", "text_weights"})

    def inject(self, target: PeftTarget) -> list[nn.Module]:
        for module in (target.vision, target.text):
            module.requires_grad_(True)
        return [target.vision, target.text]
