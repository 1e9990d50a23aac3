"""Bottleneck adapter baselines: Adapter (Houlsby, serial) and AdaptFormer (parallel, scaled).

Both put a down-projection, an activation and a zero-initialised up-projection at the MLP/FFN of
chosen layers of both backbones, so both start as an exact no-op on the frozen backbones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from src.errors import ConfigError
from src.models.peft.base import PeftMethod, PeftTarget
from src.models.peft.injection import TextPlacement, VisionPlacement, attach_text, attach_vision
from src.models.peft.registry import register_method

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class Bottleneck(nn.Module):
    """`scale * up(act(down(x)))`, the up-projection zero-initialised (the adapter starts as zero)."""

    def __init__(self, dim: int, rank: int, activation: str, scale: float) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.down = nn.Linear(dim, rank)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(rank, dim)
        self.scale = scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(x)))


@dataclass
class BottleneckMethod(PeftMethod):
    """A bottleneck of width `rank` at the MLP/FFN of chosen layers of both backbones.

    Layer lists left null take the model's `adapter_layers`.
    """

    vision_layers: Sequence[int] | None = None
    text_layers: Sequence[int] | None = None
    rank: int = 32  # bottleneck width
    activation: str = "relu"  # relu | gelu
    scale: float = 1.0  # multiplies the adapter's output

    vision_placement: VisionPlacement = "serial"
    text_placement: TextPlacement = "serial"

    trains = frozenset({"vision_layers", "text_layers"})

    def inject(self, target: PeftTarget) -> list[nn.Module]:
        vision, text = target.vision, target.text
        vision_layers = self.layers_or_default(self.vision_layers, target.adapter_layers, "vision")
        text_layers = self.layers_or_default(self.text_layers, target.adapter_layers, "text")
        return [
            *attach_vision(vision, vision_layers, lambda: self._make(vision.embed_dim), 1.0, self.vision_placement),
            *attach_text(text, text_layers, lambda: self._make(text.hidden_size), self.text_placement),
        ]

    def _make(self, dim: int) -> Bottleneck:
        return Bottleneck(dim, self.rank, self.activation, self.scale)


@register_method("adapter")
@dataclass
class Adapter(BottleneckMethod):
    """Houlsby-style serial adapter: `m + up(act(down(m)))` on the MLP/FFN output `m`, before the residual."""


@register_method("adaptformer")
@dataclass
class AdaptFormer(BottleneckMethod):
    """AdaptFormer: `mlp(u) + scale * up(act(down(u)))`, a bottleneck beside the MLP/FFN on its input."""

    scale: float = 0.1
    vision_placement: VisionPlacement = "parallel"
    text_placement: TextPlacement = "parallel"
