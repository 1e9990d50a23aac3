"""The LightningModule: trains a Grounder with the grounding loss, evaluates Acc@0.5 per split."""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torchmetrics import MeanMetric

from src.data.problems import SkippedRecords
from src.errors import UserError
from src.models.grounder import Grounder, GrounderOutput
from src.storage.checkpoints import (
    CHECKPOINT_FORMAT,
    MODEL_PREFIX,
    check_fingerprint,
    check_state,
    frozen_fingerprint,
    strip_prefix,
    trainable_state,
)
from src.training.losses import GroundingLoss
from src.training.metrics import GroundingAccuracy, SampleIoU, split_metric_key

log = logging.getLogger(__name__)

MODEL_INPUTS = ("image", "pixel_mask", "text_ids", "text_mask", "prior_ids", "prior_mask", "image_key")


def rng_states() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and Python RNG states as plain data (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` saved."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class NonFiniteError(UserError, FloatingPointError):
    """A NaN or infinite loss or gradient; the message names the step, the batch's images and the loss terms."""


@dataclass
class OverflowGuard:
    """When fp16 training has gone wrong for good: GradScaler skips an overflowing step and halves its scale,
    which is routine, but `max_skipped_steps` consecutive skipped steps, or a scale pushed below
    `min_loss_scale`, mean the loss diverged or the model cannot train in fp16."""

    max_skipped_steps: int = 20
    min_loss_scale: float = 2.0**-14
    skipped: int = field(default=0, init=False)  # consecutive skipped steps so far

    def after_step(self, finite: bool, scale: float, backoff: float) -> str | None:
        """Count this step (finite gradients reset the count); the reason to stop, or None."""
        self.skipped = 0 if finite else self.skipped + 1
        if finite:
            return None
        if self.skipped >= self.max_skipped_steps or scale * backoff < self.min_loss_scale:
            return (f"{self.skipped} consecutive steps overflowed and the loss scale fell to {scale * backoff:g} "
                    f"(limits: overflow_guard.max_skipped_steps={self.max_skipped_steps}, "
                    f"overflow_guard.min_loss_scale={self.min_loss_scale:g}); the loss diverges or the model "
                    "cannot train in fp16: lower the learning rate or use trainer.precision=bf16-mixed")
        return None


def grad_scaler(trainer: L.Trainer) -> torch.amp.GradScaler | None:
    """The trainer's enabled fp16 GradScaler (16-mixed precision), else None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


class GroundingModule(L.LightningModule):
    """Wraps a Grounder: loss, optimiser groups, validation on `val`, testing on named splits.

    Metric keys are `train/loss`, `val/acc50`, `val/miou` and `test/<split>/acc50` etc., where the
    test split names come from `test_split_names` (set by the runner to the datamodule's splits).
    """

    def __init__(
        self,
        model: Grounder,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        group_lr: dict[str, float] | None = None,
        full_backbone_lr: float | None = None,
        loss: GroundingLoss | None = None,
        config: dict[str, Any] | None = None,
        eval_fp32: bool = False,
        choices: dict[str, str] | None = None,
        overflow_guard: OverflowGuard | None = None,
    ) -> None:
        super().__init__()
        # No save_hyperparameters: checkpoints carry the resolved run config as plain data instead, so
        # that they load with torch.load(weights_only=True) and rebuild the model on their own.
        self.model = model
        self.config = dict(config or {})
        self.choices = dict(choices or {})  # the config-group choices (model=..., peft=...), for the record
        self.strict_loading = False  # checkpoints hold only what trains; on_load_checkpoint checks the keys
        self._frozen_fingerprint: dict[str, list[float]] | None = None
        # The latest training batch's image files and loss terms, for the non-finite guard's message.
        self._last_batch: tuple[list[str] | None, dict[str, torch.Tensor]] = (None, {})
        self.loss = loss or GroundingLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.group_lr = dict(group_lr or {})
        # The backbones' own pretrained weights train at their own LR when a method unfreezes them (peft=full):
        # at the LR of new adapter modules they are pushed far from what pretraining gave them.
        self.full_backbone_lr = full_backbone_lr
        self.val_metric = GroundingAccuracy()
        # sample-weighted, summed over processes: exact under DDP's unequal per-process shares
        self.val_loss = MeanMetric()
        self.test_split_names: list[str] = ["test"]
        self.test_metrics = nn.ModuleList()
        self.test_sample_metrics = nn.ModuleList()
        # The latest test loop's per-sample outcomes by split name: (sample indices, IoUs), in index order.
        self.test_samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.skipped = SkippedRecords()  # records left out of their batch under data.bad_records=skip
        self.eval_fp32 = eval_fp32  # validation and test without autocast (the official evaluation is fp32)
        self.overflow_guard = overflow_guard or OverflowGuard()

    def evaluate(self, batch: dict[str, Any]) -> torch.Tensor:
        """Predicted boxes for an evaluation batch, in fp32 without autocast when eval_fp32 is set."""
        with torch.autocast(self.device.type, enabled=False) if self.eval_fp32 else contextlib.nullcontext():
            return self(batch).boxes

    def _has_samples(self, stage: str, batch: dict[str, Any]) -> bool:
        """Count the batch's skipped records (data.bad_records=skip); False when none of its samples is left."""
        if batch.get("skipped"):
            self.skipped.note(stage, batch["skipped"])
        return "image" in batch

    def forward(self, batch: dict[str, Any], return_features: bool = False) -> GrounderOutput:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        return self.model(**inputs, return_features=return_features)

    def on_train_epoch_start(self) -> None:
        """Put the grounder in training mode through its own train(): frozen backbones then run without
        dropout (clean mode). Lightning 2 never calls train() itself; it only restores, after each
        validation, the per-module modes it captured before it."""
        self.model.train()

    def on_train_start(self) -> None:
        """The same at the start of training: a run resumed inside an epoch gets no on_train_epoch_start for it
        (its frozen backbones would otherwise train with dropout until the next epoch)."""
        self.model.train()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if not self._has_samples("train", batch):  # every sample skipped: no step (under DDP a zero step,
            # so that the other processes' gradient all-reduce still finds this one)
            if self.trainer.world_size == 1:
                return None
            return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
        losses = self.loss(self(batch).boxes, batch["box"])
        self._last_batch = (batch.get("image_file"), {k: v.detach() for k, v in losses.items()})
        local_bad = ~torch.isfinite(torch.stack(list(self._last_batch[1].values()))).all()
        bad = local_bad.float()
        if self.trainer.world_size > 1:  # every process learns of a bad loss anywhere and stops with the others
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item():  # one host sync per step
            self._non_finite("loss", local=bool(local_bad))
        if self._logging_step():
            self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(batch["box"]))
            self.log_dict({"train/l1": losses["l1"], "train/giou": losses["giou"]}, batch_size=len(batch["box"]))
        return losses["loss"]

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's logged values (every `log_every_n_steps`). Step values it
        does not write are skipped: on CPU each `self.log` call cost ~3 ms (Lightning moves its result
        metric, deep-copying the metadata), about a sixth of the default job's training step."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before a non-finite gradient reaches the weights (the last checkpoint stays good).

        Under DDP the gradients are already averaged over processes, so every process sees the same verdict
        and all stop together. With fp16's GradScaler an overflow is routine: the scaler skips that step and
        lowers its scale, so only a collapse stops the run (`OverflowGuard`).
        """
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        scaler = grad_scaler(self.trainer)
        if scaler is not None:
            collapse = self.overflow_guard.after_step(finite, scaler.get_scale(), scaler.get_backoff_factor())
            if collapse:
                self._non_finite(f"gradient in fp16: {collapse}")
            if not finite:
                log.info("fp16 overflow at global step %d: GradScaler skips the step and lowers its scale to %g",
                         self.global_step, scaler.get_scale() * scaler.get_backoff_factor())
            return
        if not finite:
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
            self._non_finite(f"gradient of {len(bad)} tensors (first: {', '.join(bad[:3])})")

    def _non_finite(self, what: str, local: bool = True) -> None:
        """Raise NonFiniteError naming the step, the loss terms and the batch's images; with several
        processes, every process raises the same message, naming the processes that saw it (`local`)."""
        files, terms = self._last_batch
        terms = {k: float(v) for k, v in terms.items()}
        shown = ", ".join(map(str, (files or [])[:8])) + (" ..." if files and len(files) > 8 else "")
        detail = f"loss terms {terms}; batch images: {shown or 'unknown'}"
        where = ""
        if self.trainer.world_size > 1:
            details: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(details, detail if local else None)
            seen = [(rank, d) for rank, d in enumerate(details) if d is not None]
            where = f" on process(es) {[rank for rank, _ in seen]} of {self.trainer.world_size}"
            detail = "; ".join(f"process {rank}: {d}" for rank, d in seen)
        raise NonFiniteError(
            f"non-finite {what} at global step {self.global_step} (epoch {self.current_epoch}){where}; {detail}"
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """Update the validation loss and metric; the predicted boxes go to callbacks (the W&B table)."""
        if not self._has_samples("val", batch):
            return None
        pred = self.evaluate(batch)
        self.val_loss.update(self.loss(pred, batch["box"])["loss"], weight=len(pred))
        self.val_metric.update(pred, batch["box"])
        return pred

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute())
        self.val_loss.reset()
        scores = self.val_metric.compute()
        self.log("val/acc50", scores["acc50"], prog_bar=True)
        self.log("val/miou", scores["miou"])
        self.val_metric.reset()

    def set_test_splits(self, names: Sequence[str]) -> None:
        """Name the test dataloaders (in order); one metric per split."""
        self.test_split_names = list(names)

    def on_test_start(self) -> None:
        self.test_metrics = nn.ModuleList(GroundingAccuracy() for _ in self.test_split_names).to(self.device)
        self.test_sample_metrics = nn.ModuleList(SampleIoU() for _ in self.test_split_names).to(self.device)
        self.test_samples = {}

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._has_samples(f"test/{self.test_split_names[dataloader_idx]}", batch):
            return
        pred = self.evaluate(batch)
        self.test_metrics[dataloader_idx].update(pred, batch["box"])
        if "index" in batch:  # the suite's datasets give each sample's index; batches made by hand may not
            self.test_sample_metrics[dataloader_idx].update(pred, batch["box"], batch["index"])

    def on_test_epoch_end(self) -> None:
        for name, metric in zip(self.test_split_names, self.test_metrics, strict=True):
            scores = metric.compute()
            self.log(split_metric_key(name, "acc50"), scores["acc50"], add_dataloader_idx=False)
            self.log(split_metric_key(name, "miou"), scores["miou"], add_dataloader_idx=False)
            self.log(split_metric_key(name, "n"), scores["n"].float(), add_dataloader_idx=False)
            metric.reset()
        for name, samples in zip(self.test_split_names, self.test_sample_metrics, strict=True):
            if samples.update_count == 0 and self.trainer.world_size == 1:
                continue  # batches without sample indices (made by hand): no record
            index, iou = samples.compute()  # gathered from every process
            self.test_samples[name] = (index.cpu().numpy(), iou.float().cpu().numpy())
            samples.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only what trains (plus its BatchNorm buffers), the run config and the frozen fingerprint."""
        state = trainable_state(self.model)
        checkpoint["state_dict"] = {MODEL_PREFIX + k: v for k, v in state.items()}
        if self._frozen_fingerprint is None:  # the frozen tensors never change during a run
            self._frozen_fingerprint = frozen_fingerprint(self.model, state)
        checkpoint.update(format=CHECKPOINT_FORMAT, config=self.config, choices=self.choices,
                          frozen_fingerprint=self._frozen_fingerprint, rng_states=rng_states())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another config (the message lists the keys) before Lightning loads it."""
        state = strip_prefix(checkpoint["state_dict"])
        check_state(self.model, state, "the checkpoint")
        check_fingerprint(self.model, state, checkpoint.get("frozen_fingerprint") or {}, "the checkpoint")
        if checkpoint.get("rng_states") and self.trainer.state.fn == TrainerFn.FITTING:
            # resuming: the next epoch's shuffle is drawn as the uninterrupted run would draw it
            set_rng_states(checkpoint["rng_states"])

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = self.build_optimizer(int(self.trainer.estimated_stepping_batches))
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def group_learning_rates(self) -> dict[str, float]:
        """The LR of each optimiser group that does not train at the optimiser's own: `group_lr`, and for a
        method that trains the backbones' own weights (full fine-tuning) `full_backbone_lr` for both backbones."""
        rates = dict(self.group_lr)
        if not self.model.backbones_frozen and self.full_backbone_lr is not None:
            rates |= {"vision": self.full_backbone_lr, "text": self.full_backbone_lr}
        return rates

    def build_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Any | None]:
        """The optimiser over the trainable groups (per-group LRs from `group_learning_rates`) and its scheduler.

        A scheduler factory that takes `total_steps` is given the run's number of optimiser steps.
        """
        rates = self.group_learning_rates()
        groups = [
            {"params": params, "name": role, **({"lr": rates[role]} if role in rates else {})}
            for role, params in self.model.optimizer_groups().items()
            if params
        ]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer, None
        kwargs = {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters:
            kwargs["total_steps"] = total_steps
        return optimizer, self.scheduler_factory(optimizer, **kwargs)
