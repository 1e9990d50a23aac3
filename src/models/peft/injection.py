"""Where adapters attach inside the backbones, by the roles the encoders declare (src/models/roles.py);
shared by every adapter-style PEFT method.

Vision (the `mlp` of a ViT block): `parallel` runs the adapter beside the MLP on the MLP's input and adds
its scaled output to the MLP's output; `serial` runs it on the MLP's output and adds it back (Houlsby).
Both sit inside the block's LayerScale.
Text, around the FFN and its residual LayerNorm: `parallel` reads the FFN's input and adds to the residual
before the LayerNorm; `parallel_after_norm` adds to the normalised output (the official DyPA placement);
`serial` runs on the FFN's output before the residual. BERT-like layers take the adapter in their
`ffn_output` block (dense, dropout, residual LayerNorm); post-norm layers with a whole `mlp` and its
`mlp_norm` (DistilBERT) take it at those two parts, to the same effect.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from src.errors import ConfigError

if TYPE_CHECKING:
    from src.models.encoders import TextEncoder, VisionEncoder

VisionPlacement = Literal["parallel", "serial"]
TextPlacement = Literal["parallel", "parallel_after_norm", "serial"]
VISION_PLACEMENTS = ("parallel", "serial")
TEXT_PLACEMENTS = ("parallel", "parallel_after_norm", "serial")


class AdaptedMlp(nn.Module):
    """An MLP with an adapter beside it (`mlp(u) + s * a(u)`) or after it (`m + s * a(m)`)."""

    def __init__(self, mlp: nn.Module, adapter: nn.Module, scale: float, placement: VisionPlacement) -> None:
        super().__init__()
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
        self.output = output
        self.adapter = adapter
        self.placement = placement

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.placement == "parallel_after_norm":
            return self.output(hidden_states, input_tensor) + self.adapter(input_tensor)
        out = self.output.dropout(self.output.dense(hidden_states))
        delta = self.adapter(input_tensor if self.placement == "parallel" else out)
        return self.output.LayerNorm(out + input_tensor + delta)


class Handoff:
    """Carries a tensor from the wrapper that sees it to the one that needs it within one layer's forward
    (a plain object, so that it adds no state-dict keys)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the adapter at the layer's norm ran before the MLP handed it its input")
        return value


class MlpInputTap(nn.Module):
    """A post-norm layer's MLP, unchanged, that hands its input on to the adapter at the layer's norm."""

    def __init__(self, mlp: nn.Module, handoff: Handoff) -> None:
        super().__init__()
        self.mlp = mlp
        self.handoff = handoff

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        self.handoff.value = u
        return self.mlp(u)


class AdaptedNorm(nn.Module):
    """A post-norm layer's residual LayerNorm plus an adapter on the MLP's input: `norm(f + u) + a(u)`."""

    def __init__(self, norm: nn.Module, adapter: nn.Module, handoff: Handoff) -> None:
        super().__init__()
        self.norm = norm
        self.adapter = adapter
        self.handoff = handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.adapter(self.handoff.take())


def check_layers(layers: Sequence[int], depth: int, what: str) -> list[int]:
    """Validate a configured list of 0-based layer indices against the backbone depth."""
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"{what} layers {bad} do not exist in a backbone of depth {depth}")
    return chosen


def attach_vision(
    encoder: VisionEncoder, layers: Sequence[int], make: Callable[[], nn.Module], scale: float,
    placement: VisionPlacement = "parallel",
) -> list[nn.Module]:
    """Put `make()` at the `mlp` of each chosen ViT block; returns the new adapters."""
    if placement not in VISION_PLACEMENTS:
        raise ConfigError(f"peft.vision_placement must be parallel or serial, got {placement!r}")
    adapters = []
    for i in check_layers(layers, len(encoder.layers), "vision"):
        adapter = make()
        encoder.roles.wrap(encoder.layers[i], "mlp", lambda mlp, a=adapter: AdaptedMlp(mlp, a, scale, placement))
        adapters.append(adapter)
    return adapters


def attach_text(
    encoder: TextEncoder, layers: Sequence[int], make: Callable[[], nn.Module], placement: TextPlacement,
) -> list[nn.Module]:
    """Put `make()` at the FFN of each chosen text layer; returns the new adapters."""
    if placement not in TEXT_PLACEMENTS:
        raise ConfigError(f"peft.text_placement must be one of {', '.join(TEXT_PLACEMENTS)}, got {placement!r}")
    adapters = []
    for i in check_layers(layers, len(encoder.layers), "text"):
        adapter = make()
        place_text_adapter(encoder, encoder.layers[i], adapter, placement)
        adapters.append(adapter)
    return adapters


def place_text_adapter(encoder: TextEncoder, layer: nn.Module, adapter: nn.Module, placement: TextPlacement) -> None:
    """One text layer's adapter: in its `ffn_output` block (BERT-like), else at its `mlp` and `mlp_norm`."""
    roles = encoder.roles
    if roles.has("ffn_output"):
        roles.wrap(layer, "ffn_output", lambda output: AdaptedBertOutput(output, adapter, placement))
    elif placement == "parallel_after_norm":
        handoff = Handoff()
        roles.wrap(layer, "mlp", lambda mlp: MlpInputTap(mlp, handoff))
        roles.wrap(layer, "mlp_norm", lambda norm: AdaptedNorm(norm, adapter, handoff))
    else:
        roles.wrap(layer, "mlp", lambda mlp: AdaptedMlp(mlp, adapter, 1.0, placement))
