"""Grounding metrics: Acc@0.5 (the official definition) and mean IoU, as a DDP-safe torchmetrics Metric."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchvision.ops import box_convert


def paired_iou(pred_xyxy: torch.Tensor, target_xyxy: torch.Tensor, eps: float = 1e-16) -> torch.Tensor:
    """IoU of each predicted box with its own target (N, 4) x (N, 4) -> (N,). Not `box_iou(p, t).diag()`:
    that builds the N x N matrix of every pair (a million entries for a 1,024-sample batch) for N values."""
    lt = torch.maximum(pred_xyxy[:, :2], target_xyxy[:, :2])
    rb = torch.minimum(pred_xyxy[:, 2:], target_xyxy[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_p = (pred_xyxy[:, 2:] - pred_xyxy[:, :2]).clamp(min=0).prod(dim=1)
    area_t = (target_xyxy[:, 2:] - target_xyxy[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area_p + area_t - inter + eps)


def canvas_iou(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """IoU of normalised (cx, cy, w, h) boxes after converting to xyxy and clamping to the canvas."""
    pred = box_convert(pred_cxcywh.float(), "cxcywh", "xyxy").clamp(0, 1)
    target = box_convert(target_cxcywh.float(), "cxcywh", "xyxy").clamp(0, 1)
    return paired_iou(pred, target)


def split_metric_key(split: str, name: str) -> str:
    """The logged name of a test split's metric, `test/<split>/<name>` (e.g. `test/testA/acc50`): every test
    split under one `test/` prefix (one W&B section), as `val/acc50` for validation."""
    return f"test/{split}/{name}"


class GroundingAccuracy(Metric):
    """Acc@threshold (share of predictions with IoU >= threshold) and mean IoU over all samples."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("hits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of normalised (cx, cy, w, h) predictions and targets, both (N, 4)."""
        if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != 4:
            raise ValueError(f"expected two (N, 4) cxcywh tensors, got {tuple(pred.shape)} and {tuple(target.shape)}")
        iou = canvas_iou(pred, target)
        self.hits += (iou >= self.threshold).sum().double()
        self.iou_sum += iou.sum().double()
        self.count += iou.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count.clamp(min=1).double()
        return {"acc50": (self.hits / n).float(), "miou": (self.iou_sum / n).float(), "n": self.count.clone()}


class SampleIoU(Metric):
    """Every evaluated sample's IoU with its index in the split, gathered from every process: the per-sample
    record of a test split (`src.analysis.samples`), which paired comparisons of methods resample."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # Both float32: a process that saw no sample contributes an empty tensor of the metric's dtype, which
        # must match the others' to be gathered (indices stay exact up to 2^24 samples).
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("iou", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> None:
        """Add a batch of normalised (cx, cy, w, h) predictions and targets, both (N, 4), and the samples' indices."""
        self.index.append(index.float())
        self.iou.append(canvas_iou(pred, target))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The indices (int64) and IoUs of every sample seen, in index order."""
        if isinstance(self.index, list) and not self.index:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        index, iou = dim_zero_cat(self.index), dim_zero_cat(self.iou)
        order = index.argsort()
        return index[order].long(), iou[order]
