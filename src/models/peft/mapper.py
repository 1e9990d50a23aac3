"""MaPPER's PEFT modules: LoCA (vision), DyPA (text, prior-guided) and PGT (text-prior merge)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from src.errors import ConfigError
from src.models.encoders import ConditionSlot, TextPrior
from src.models.peft.base import PeftMethod, PeftTarget
from src.models.peft.injection import attach_text, attach_vision
from src.models.peft.registry import Part, register_method


class LoCA(nn.Module):
    """Local Convolution Adapter: a bottleneck whose patch rows pass through 1x1 and 1x1->3x3 convs.

    z = ReLU(fc1(u)); the patch rows of z, as a (hidden, H, W) map, go through two conv branches whose
    channels concatenate back to `hidden`; z is added as a residual; fc2 maps back to the model width.
    """

    def __init__(
        self, dim: int, hidden: int, branch1: int, branch2_mid: int, branch2_out: int,
        grid: tuple[int, int], num_prefix_tokens: int, doubled_prefix: bool, official_init: bool,
    ) -> None:
        super().__init__()
        if branch1 + branch2_out != hidden:
            raise ConfigError(f"LoCA branches ({branch1} + {branch2_out}) must add up to hidden ({hidden})")
        self.grid = grid
        self.num_prefix_tokens = num_prefix_tokens
        self.doubled_prefix = doubled_prefix
        self.fc1 = nn.Linear(dim, hidden)
        self.branch1 = _conv_bn(hidden, branch1, 1)
        self.branch2 = nn.Sequential(_conv_bn(hidden, branch2_mid, 1), _conv_bn(branch2_mid, branch2_out, 3))
        self.fc2 = nn.Linear(hidden, dim)
        for fc in (self.fc1, self.fc2):
            nn.init.zeros_(fc.bias)
            if official_init:
                nn.init.trunc_normal_(fc.weight, std=0.02)
        if not official_init:
            nn.init.kaiming_uniform_(self.fc1.weight, a=math.sqrt(5))
            nn.init.zeros_(self.fc2.weight)  # starts as an exact no-op on the frozen backbone

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.fc1(u))
        prefix, patches = z[:, : self.num_prefix_tokens], z[:, self.num_prefix_tokens :]
        b, n, c = patches.shape
        fmap = patches.transpose(1, 2).reshape(b, c, *self.grid)
        local = torch.cat([self.branch1(fmap), self.branch2(fmap)], dim=1).flatten(2).transpose(1, 2)
        head = prefix if self.doubled_prefix else torch.zeros_like(prefix)
        return self.fc2(torch.cat([head, local], dim=1) + z)


def _conv_bn(c_in: int, c_out: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.BatchNorm2d(c_out, eps=1e-3), nn.ReLU())


class DyPA(nn.Module):
    """Dynamic Prior Adapter: a bottleneck on BERT features, scaled per token by the CLIP prior.

    delta = up(ReLU(down(LN(h)))) * ReLU(scale(LN(P))); P is read from the text encoder's condition slot.
    Without a prior (`prior_dim=None`, the "w/o prior" ablation) the gate is 1: a plain bottleneck.
    """

    def __init__(
        self, dim: int, prior_dim: int | None, rank: int, slot: ConditionSlot, official_init: bool,
    ) -> None:
        super().__init__()
        self.slot = slot
        self.norm = nn.LayerNorm(dim)
        guided = prior_dim is not None
        self.prior_norm = nn.LayerNorm(prior_dim) if guided else None
        self.scale = nn.Linear(prior_dim, 1) if guided else None
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        # The official module also builds a CLIP down-projection its forward never uses; official mode
        # keeps it so that checkpoints load and parameter counts match (it trains nothing).
        self.unused_prior_down = nn.Linear(prior_dim, rank) if official_init and guided else None
        if self.unused_prior_down is not None:
            self.unused_prior_down.never_in_forward = True  # DDP must then look for unused parameters
        for lin in (self.scale, self.down, self.up, self.unused_prior_down):
            if lin is None:
                continue
            nn.init.zeros_(lin.bias)
            if official_init:
                nn.init.normal_(lin.weight, std=0.02)
            else:
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
        if not official_init:
            nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(F.relu(self.down(self.norm(h))))
        if self.scale is None:
            return delta
        return delta * F.relu(self.scale(self.prior_norm(self.slot.get().float())))


class PGT(nn.Module):
    """Prior-Guided Text: one linear map of [text features ; prior] back to the text width."""

    def __init__(self, text_dim: int, prior_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim + prior_dim, text_dim)
        nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.proj.bias)

    def forward(self, text: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([text, prior.to(text.dtype)], dim=-1))


class MapperTarget(PeftTarget, Protocol):
    """What MaPPER needs beyond any method's target: the frozen CLIP prior (built because the method
    `uses_prior`) and the slot that merges it into the text features (PGT goes there)."""

    prior: TextPrior | None
    text_merge: nn.Module | None


def prior_width(target: MapperTarget) -> int:
    """The CLIP prior's projected width, which DyPA's gate and PGT read."""
    if target.prior is None:
        raise ConfigError("this PEFT method needs the CLIP prior, but the grounder was built without one")
    return target.prior.dim


@register_method("mapper")
@dataclass
class Mapper(PeftMethod):
    """MaPPER: LoCA beside the MLP of chosen ViT blocks, DyPA at the FFN of chosen text layers, PGT after
    the text encoder.

    Layer lists left null take the model's `adapter_layers` (the paper: 3, 7, 11 of 12). The switches
    `loca`, `dypa`, `pgt` and `prior` remove one component each for the paper's ablations.
    """

    vision_layers: Sequence[int] | None = None
    text_layers: Sequence[int] | None = None
    rank: int = 32  # DyPA bottleneck width
    loca_hidden: int = 288  # LoCA bottleneck width = loca_branch1 + loca_branch2_out
    loca_branch1: int = 192  # 1x1 conv branch channels
    loca_branch2_mid: int = 24  # 1x1 reduction before the 3x3 conv
    loca_branch2_out: int = 96  # 3x3 conv branch channels
    loca_scale: float = 0.2  # weight of LoCA's output beside the MLP
    loca: bool = True  # Local Convolution Adapters in the ViT
    dypa: bool = True  # Dynamic Prior Adapters in the text encoder
    pgt: bool = True  # Prior-Guided Text merge after the text encoder (needs the prior)
    prior: bool = True  # the CLIP prior; off: DyPA becomes a plain bottleneck (gate 1) and PGT must be off

    def __post_init__(self) -> None:
        if self.pgt and not self.prior:
            raise ConfigError("mapper: pgt=true merges the CLIP prior into the text, so it needs prior=true")
        if not (self.loca or self.dypa or self.pgt):
            raise ConfigError("mapper: every component is off; use peft=frozen for that baseline")

    @property
    def uses_prior(self) -> bool:
        return self.prior and (self.dypa or self.pgt)

    @property
    def trains(self) -> frozenset[Part]:
        """The parts its switched-on components train: LoCA, DyPA, PGT."""
        switches = (("vision_layers", self.loca), ("text_layers", self.dypa), ("text_merge", self.pgt))
        return frozenset(part for part, on in switches if on)

    def inject(self, target: MapperTarget) -> list[nn.Module]:
        vision, text, quirks = target.vision, target.text, target.quirks
        modules: list[nn.Module] = []
        if self.loca:
            vision_layers = self.layers_or_default(self.vision_layers, target.adapter_layers, "vision")
            modules += attach_vision(
                vision, vision_layers,
                lambda: LoCA(
                    vision.embed_dim, self.loca_hidden, self.loca_branch1, self.loca_branch2_mid,
                    self.loca_branch2_out, vision.grid, vision.num_prefix_tokens,
                    quirks.loca_doubled_prefix, quirks.loca_official_init,
                ),
                self.loca_scale,
            )
        if self.dypa:
            text_layers = self.layers_or_default(self.text_layers, target.adapter_layers, "text")
            prior_dim = prior_width(target) if self.prior else None
            modules += attach_text(
                text, text_layers,
                lambda: DyPA(text.hidden_size, prior_dim, self.rank, text.condition, quirks.dypa_official_init),
                "parallel_after_norm" if quirks.dypa_after_ffn_norm else "parallel",
            )
        if self.pgt:
            pgt = PGT(text.hidden_size, prior_width(target))
            target.text_merge = pgt
            modules.append(pgt)
        return modules
