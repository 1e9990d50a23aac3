"""A grounding loss that turns NaN on one process at one training step: the all-rank stop test's fault."""

from __future__ import annotations

import torch

from src.training.losses import GroundingLoss


class NaNLossOnRank(GroundingLoss):
    """GroundingLoss whose total becomes NaN at training call `at_call` (1-based) on process `rank` only."""

    def __init__(self, rank: int, at_call: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rank, self.at_call, self.calls = rank, at_call, 0

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = super().forward(pred, target)
        if not self.training:
            return losses
        self.calls += 1
        here = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if here == self.rank and self.calls == self.at_call:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses
