"""Where adapters attach inside the backbones, shared by every adapter-style PEFT method.

Vision: an adapter runs beside (parallel to) the MLP of a timm ViT block, on the MLP's input, and its
scaled output is added to the MLP's output, inside the block's LayerScale.
Text: an adapter reads a BERT layer's attention output (the FFN block's input) and its output is added
to the FFN block, either before the block's residual LayerNorm or after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ParallelMlp(nn.Module):
    """`mlp(u) + scale * adapter(u)`: an adapter beside a ViT block's MLP."""

    def __init__(self, mlp: nn.Module, adapter: nn.Module, scale: float) -> None:
        super().__init__()
        self.mlp = mlp
        self.adapter = adapter
        self.scale = scale

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.mlp(u) + self.scale * self.adapter(u)


class AdaptedBertOutput(nn.Module):
    """BERT's FFN output block (dense, dropout, residual LayerNorm) plus an adapter on its input.

    `after_norm=False` adds the adapter inside the residual, before the LayerNorm;
    `after_norm=True` adds it to the normalised output (the official DyPA placement).
    """

    def __init__(self, output: nn.Module, adapter: nn.Module, after_norm: bool) -> None:
        super().__init__()
        self.output = output
        self.adapter = adapter
        self.after_norm = after_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        delta = self.adapter(input_tensor)
        if self.after_norm:
            return self.output(hidden_states, input_tensor) + delta
        out = self.output.dropout(self.output.dense(hidden_states))
        return self.output.LayerNorm(out + input_tensor + delta)


def check_layers(layers: Sequence[int], depth: int, what: str) -> list[int]:
    """Validate a configured list of 0-based layer indices against the backbone depth."""
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{what} layers {bad} do not exist in a backbone of depth {depth}")
    return chosen


def attach_vision(blocks: nn.Sequential, layers: Sequence[int], make, scale: float) -> list[nn.Module]:
    """Put `make()` beside the MLP of each chosen ViT block; returns the new adapters."""
    adapters = []
    for i in check_layers(layers, len(blocks), "vision"):
        adapter = make()
        blocks[i].mlp = ParallelMlp(blocks[i].mlp, adapter, scale)
        adapters.append(adapter)
    return adapters


def attach_text(layers_module: nn.ModuleList, layers: Sequence[int], make, after_norm: bool) -> list[nn.Module]:
    """Add `make()` around the FFN block of each chosen BERT layer; returns the new adapters."""
    adapters = []
    for i in check_layers(layers, len(layers_module), "text"):
        adapter = make()
        layer = layers_module[i]
        layer.output = AdaptedBertOutput(layer.output, adapter, after_norm)
        adapters.append(adapter)
    return adapters
