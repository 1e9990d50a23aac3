"""Acc@0.5 / mean IoU on hand-computed cases, and the L1 + GIoU loss."""

from __future__ import annotations

import pytest
import torch

from src.training.losses import GroundingLoss
from src.training.metrics import GroundingAccuracy, canvas_iou


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_iou_hand_computed():
    target = boxes([0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2])
    pred = boxes([0.55, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2])  # overlaps 0.15x0.2 and 0.1x0.2
    assert canvas_iou(pred, target).tolist() == pytest.approx([0.03 / 0.05, 0.02 / 0.06], abs=1e-6)


def test_accuracy_and_mean_iou():
    metric = GroundingAccuracy()
    metric.update(boxes([0.55, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]), boxes([0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]))
    out = metric.compute()
    assert out["acc50"].item() == pytest.approx(0.5)
    assert out["miou"].item() == pytest.approx((0.6 + 1 / 3) / 2, abs=1e-6)
    assert out["n"].item() == 2


def test_threshold_is_inclusive():
    # target [0.25,0.25,0.75,0.75]; prediction [0.25,0.25,0.75,0.5] covers exactly half of it: IoU = 0.5
    metric = GroundingAccuracy()
    metric.update(boxes([0.5, 0.375, 0.5, 0.25]), boxes([0.5, 0.5, 0.5, 0.5]))
    assert metric.compute()["acc50"].item() == 1.0


def test_boxes_are_clamped_to_the_canvas():
    # the prediction spills over the right edge; clamped it equals the target
    pred, target = boxes([0.9, 0.5, 0.4, 0.2]), boxes([0.85, 0.5, 0.3, 0.2])
    assert canvas_iou(pred, target).item() == pytest.approx(1.0, abs=1e-6)


def test_merged_states_equal_one_pass():
    torch.manual_seed(0)
    pred, target = torch.rand(10, 4) * 0.5 + 0.25, torch.rand(10, 4) * 0.5 + 0.25
    whole, a, b = GroundingAccuracy(), GroundingAccuracy(), GroundingAccuracy()
    whole.update(pred, target)
    a.update(pred[:3], target[:3])
    b.update(pred[3:], target[3:])
    a.merge_state(b)
    for k in ("acc50", "miou", "n"):
        assert a.compute()[k].item() == pytest.approx(whole.compute()[k].item())


def test_metric_rejects_bad_shapes():
    with pytest.raises(ValueError, match="cxcywh"):
        GroundingAccuracy().update(torch.rand(3, 4), torch.rand(3, 2))


def test_loss_zero_for_perfect_boxes_and_hand_computed_otherwise():
    loss = GroundingLoss()
    t = boxes([0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2])
    assert loss(t, t)["loss"].item() == pytest.approx(0.0, abs=1e-5)  # torchvision adds eps 1e-7 to areas
    pred = boxes([0.6, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2])
    out = loss(pred, t)
    assert out["l1"].item() == pytest.approx(0.1 / 2)
    # first pair: IoU 1/3, enclosing box 0.3x0.2 = union 0.06 -> GIoU 1/3; second pair perfect
    assert out["giou"].item() == pytest.approx((1 - 1 / 3) / 2, abs=1e-5)
    weighted = GroundingLoss(l1_weight=5, giou_weight=2)(pred, t)
    assert weighted["loss"].item() == pytest.approx(5 * out["l1"].item() + 2 * out["giou"].item(), abs=1e-6)


def test_loss_gradients_flow():
    pred = boxes([0.6, 0.5, 0.2, 0.2]).requires_grad_()
    GroundingLoss()(pred, boxes([0.5, 0.5, 0.2, 0.2]))["loss"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
