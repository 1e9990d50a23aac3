"""Where adapters attach inside the backbones, shared by every adapter-style PEFT method.

Vision (a timm ViT block's MLP): `parallel` runs the adapter beside the MLP on the MLP's input and adds
its scaled output to the MLP's output; `serial` runs it on the MLP's output and adds it back (Houlsby).
Both sit inside the block's LayerScale.
Text (a BERT layer's FFN output block: dense, dropout, residual LayerNorm): `parallel` reads the FFN
block's input and adds to the residual before the LayerNorm; `parallel_after_norm` adds to the
normalised output (the official DyPA placement); `serial` runs on the FFN's output before the residual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from src.errors import ConfigError

VisionPlacement = Literal["parallel", "serial"]
TextPlacement = Literal["parallel", "parallel_after_norm", "serial"]


class AdaptedMlp(nn.Module):
    """A ViT block's MLP with an adapter beside it (`mlp(u) + s * a(u)`) or after it (`m + s * a(m)`)."""

    def __init__(self, mlp: nn.Module, adapter: nn.Module, scale: float, placement: VisionPlacement) -> None:
        super().__init__()
        if placement not in ("parallel", "serial"):
            raise ConfigError(f"vision adapter placement must be parallel or serial, got {placement!r}")
        self.mlp = mlp
        self.adapter = adapter
        self.scale = scale
        self.placement = placement

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        out = self.mlp(u)
        return out + self.scale * self.adapter(u if self.placement == "parallel" else out)


class AdaptedBertOutput(nn.Module):
    """BERT's FFN output block (dense, dropout, residual LayerNorm) with an adapter placed as configured."""

    def __init__(self, output: nn.Module, adapter: nn.Module, placement: TextPlacement) -> None:
        super().__init__()
        if placement not in ("parallel", "parallel_after_norm", "serial"):
            raise ConfigError(f"text placement must be parallel, parallel_after_norm or serial, got {placement!r}")
        self.output = output
        self.adapter = adapter
        self.placement = placement

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.placement == "parallel_after_norm":
            return self.output(hidden_states, input_tensor) + self.adapter(input_tensor)
        out = self.output.dropout(self.output.dense(hidden_states))
        delta = self.adapter(input_tensor if self.placement == "parallel" else out)
        return self.output.LayerNorm(out + input_tensor + delta)


def check_layers(layers: Sequence[int], depth: int, what: str) -> list[int]:
    """Validate a configured list of 0-based layer indices against the backbone depth."""
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"{what} layers {bad} do not exist in a backbone of depth {depth}")
    return chosen


def attach_vision(
    blocks: nn.Sequential, layers: Sequence[int], make: Callable[[], nn.Module], scale: float,
    placement: VisionPlacement = "parallel",
) -> list[nn.Module]:
    """Put `make()` at the MLP of each chosen ViT block; returns the new adapters."""
    adapters = []
    for i in check_layers(layers, len(blocks), "vision"):
        adapter = make()
        blocks[i].mlp = AdaptedMlp(blocks[i].mlp, adapter, scale, placement)
        adapters.append(adapter)
    return adapters


def attach_text(
    layers_module: nn.ModuleList, layers: Sequence[int], make: Callable[[], nn.Module], placement: TextPlacement,
) -> list[nn.Module]:
    """Put `make()` at the FFN block of each chosen BERT layer; returns the new adapters."""
    adapters = []
    for i in check_layers(layers, len(layers_module), "text"):
        adapter = make()
        layer = layers_module[i]
        layer.output = AdaptedBertOutput(layer.output, adapter, placement)
        adapters.append(adapter)
    return adapters
