"""The official training loss: L1 on normalised (cx, cy, w, h) plus GIoU, each summed over the batch
and divided by the batch size (weights 1 : 1 by default)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss


class GroundingLoss(nn.Module):
    """`l1_weight * L1 + giou_weight * (1 - GIoU)`, per sample summed over coordinates, batch-averaged."""

    def __init__(self, l1_weight: float = 1.0, giou_weight: float = 1.0) -> None:
        super().__init__()
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        b = pred.shape[0]
        l1 = (pred - target).abs().sum() / b
        giou = generalized_box_iou_loss(
            box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"), reduction="sum"
        ) / b
        return {"loss": self.l1_weight * l1 + self.giou_weight * giou, "l1": l1, "giou": giou}
