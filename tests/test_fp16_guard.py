"""fp16 mixed precision survives overflow: a real torch.amp.GradScaler on CPU skips overflowing steps and
training goes on; only a collapse (too many consecutive skips, or the scale below its floor) or a
non-finite loss stops the run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from src.config import compose
from src.run import run
from src.storage.checkpoints import read_checkpoint
from src.training.lit import GroundingModule, NonFiniteError, OverflowGuard, grad_scaler
from src.training.losses import GroundingLoss
from tests.test_default_job import TINY_JOB

# Lightning turns `16-mixed` into bf16 on CPU, so the tests give it fp16 autocast with a real GradScaler.
FP16_ON_CPU = [
    "trainer.precision=null", "+trainer.plugins=[{_target_: lightning.pytorch.plugins.precision.MixedPrecision,"
    " precision: 16-mixed, device: cpu, scaler: {_target_: torch.amp.GradScaler, device: cpu}}]",
]


def fp16_job(tmp_path: Path, *extra: str):
    return compose([f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", *TINY_JOB,
                    "trainer.max_epochs=2", "logger=csv", "visualize=0", "shuffled_text_check=false",
                    *FP16_ON_CPU, *extra])


def overflow_at(steps: set[int] | None, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Make the box head's gradient infinite at the given backward passes (None: at every one); records
    the GradScaler's scale at each optimiser step."""
    original = GroundingModule.on_train_start
    seen = {"backward": 0, "scales": []}

    def poison(self):
        original(self)
        seen["scales"] = []

        def hook(grad: torch.Tensor) -> torch.Tensor:
            seen["backward"] += 1
            return grad * float("inf") if steps is None or seen["backward"] in steps else grad

        self.model.head.layers[-1].weight.register_hook(hook)

    step = GroundingModule.on_before_optimizer_step

    def record(self, optimizer):
        seen["scales"].append(grad_scaler(self.trainer).get_scale())
        step(self, optimizer)

    monkeypatch.setattr(GroundingModule, "on_train_start", poison)
    monkeypatch.setattr(GroundingModule, "on_before_optimizer_step", record)
    return seen


def test_overflowing_steps_are_skipped_and_training_goes_on(tmp_path: Path, monkeypatch, caplog):
    seen = overflow_at({2, 3}, monkeypatch)
    with caplog.at_level(logging.INFO, logger="src.training.lit"):
        run(fp16_job(tmp_path))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    scales = seen["scales"]
    assert results["status"] == "ok" and seen["backward"] == len(scales) == 12  # 2 epochs x 6 steps, all ran
    # backward passes 2 and 3 overflowed: each was skipped and halved the scale; the next ones kept it
    assert scales[1] == scales[0] and scales[2] == scales[0] / 2 and scales[3] == scales[4] == scales[0] / 4
    assert [r.getMessage().startswith("fp16 overflow at global step") for r in caplog.records].count(True) == 2
    state, _, _ = read_checkpoint(results["best_checkpoint"])
    assert all(t.isfinite().all() for t in state.values() if t.is_floating_point())


def test_a_collapsing_scale_stops_with_the_numbers(tmp_path: Path, monkeypatch):
    overflow_at(None, monkeypatch)
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps overflowed and the loss scale fell to 8192 "
                                             r"\(limits: overflow_guard.max_skipped_steps=3"):
        run(fp16_job(tmp_path, "overflow_guard.max_skipped_steps=3"))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_a_nan_loss_still_stops_under_fp16(tmp_path: Path, monkeypatch):
    forward = GroundingLoss.forward

    def poisoned(self, pred, target):
        losses = forward(self, pred, target)
        return {**losses, "loss": losses["loss"] * float("nan")} if self.training else losses

    monkeypatch.setattr(GroundingLoss, "forward", poisoned)
    with pytest.raises(NonFiniteError, match="non-finite loss at global step 0"):
        run(fp16_job(tmp_path))


def test_overflow_guard_limits() -> None:
    guard = OverflowGuard(max_skipped_steps=3, min_loss_scale=1.0)
    assert guard.after_step(False, 1024.0, 0.5) is None and guard.after_step(False, 512.0, 0.5) is None
    assert guard.after_step(True, 256.0, 0.5) is None and guard.skipped == 0  # a good step resets the count
    assert guard.after_step(False, 1.0, 0.5).startswith("1 consecutive steps overflowed and the loss scale fell to 0.5")
