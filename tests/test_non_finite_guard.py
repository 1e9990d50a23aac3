"""A NaN or infinite loss or gradient stops the run with a useful message and a `failed` results.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from src.config import compose
from src.run import run
from src.storage.checkpoints import read_checkpoint
from src.training.lit import NonFiniteError
from src.training.losses import GroundingLoss
from tests.test_default_job import TINY_JOB


def tiny_job(tmp_path: Path):
    return compose([f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", *TINY_JOB,
                    "trainer.max_epochs=3", "logger=csv", "visualize=0"])


def check_failure_record(tmp_path: Path, what: str) -> dict:
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and f"non-finite {what}" in results["reason"]
    line = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])
    assert line["status"] == "failed" and line["reason"] == results["reason"]
    kept = results["best_checkpoint"]  # the last good checkpoint, from the epoch before the failure
    state, _, _ = read_checkpoint(kept)
    assert all(t.isfinite().all() for t in state.values() if t.is_floating_point())
    return results


def test_nan_loss_stops_the_run_naming_step_images_and_terms(tmp_path: Path, monkeypatch):
    calls = {"n": 0}
    forward = GroundingLoss.forward

    def poisoned(self, pred, target):
        calls["n"] += self.training
        losses = forward(self, pred, target)
        if calls["n"] == 8 and self.training:  # epoch 1 (6 steps per epoch), after a good checkpoint
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses

    monkeypatch.setattr(GroundingLoss, "forward", poisoned)
    with pytest.raises(NonFiniteError) as err:
        run(tiny_job(tmp_path))
    message = str(err.value)
    assert "non-finite loss at global step" in message and "'loss': nan" in message
    assert ".png" in message or ".jpg" in message  # the batch's image files
    results = check_failure_record(tmp_path, "loss")
    assert "epoch 1" in results["reason"]


def test_nan_gradient_stops_before_the_weights_change(tmp_path: Path, monkeypatch):
    from src.training.lit import GroundingModule

    original = GroundingModule.on_train_start

    def poison_grads(self):
        original(self)
        head = self.model.head.layers[-1].weight
        steps = {"n": 0}

        def hook(grad: torch.Tensor) -> torch.Tensor:
            steps["n"] += 1
            return grad * float("nan") if steps["n"] == 8 else grad

        head.register_hook(hook)

    monkeypatch.setattr(GroundingModule, "on_train_start", poison_grads)
    with pytest.raises(NonFiniteError, match="non-finite gradient of 1 tensors"):
        run(tiny_job(tmp_path))
    check_failure_record(tmp_path, "gradient")
