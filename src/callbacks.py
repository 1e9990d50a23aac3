"""Training callbacks of the suite: the `last` checkpoint that makes any run resumable after a kill, and
the W&B table of validation predictions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from src.errors import ConfigError
from src.metrics import canvas_iou
from src.report import canvas_with_boxes
from src.resume import check_processes


class LastCheckpoint(Checkpoint):
    """Write `<dirpath>/last.ckpt` every `every_n_steps` optimiser steps inside an epoch and at every epoch end.

    The file is written beside the target and moved over it in one step (`os.replace`), so a run
    killed while saving leaves the previous `last.ckpt` intact. `python -m src.run ... ckpt_path=last`
    resumes from it. It is a `Checkpoint` that runs after every other callback (see `setup`): Lightning calls the
    epoch-end hook of the checkpointing callbacks after the others', and the best-checkpoint tracker records the
    epoch there, so the epoch-end `last.ckpt` carries that record (saved before it, a resumed run forgot the best).
    Loggers are flushed before each save, and again at the next step, so their files hold every row up to the save.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 200, filename: str = "last.ckpt") -> None:
        if every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps
        self._saved_step = -1
        self._flush_next_step = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Move this callback behind every other (a new list: Lightning is iterating over the current one)."""
        trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Flush the rows logged after the save (that step's own training loss): the resumed run will not log them."""
        if self._flush_next_step:
            self._flush_next_step = False
            flush_loggers(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """Save every `every_n_steps` steps, except at an epoch's last batch: the epoch-end save follows."""
        last_batch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0 and not last_batch:
            self.save(trainer)
            self._flush_next_step = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, force=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Record the run's number of processes in every checkpoint it writes (the best one's too)."""
        checkpoint["processes"] = trainer.world_size

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to continue training on another number of processes (evaluating is fine on any)."""
        if trainer.state.fn == TrainerFn.FITTING:
            check_processes(checkpoint.get("processes"), trainer.world_size)

    def save(self, trainer: L.Trainer, force: bool = False) -> None:
        """Atomically replace the last checkpoint (once per step unless `force`, e.g. at an epoch end)."""
        if trainer.sanity_checking or (trainer.global_step == self._saved_step and not force):
            return
        self._saved_step = trainer.global_step
        flush_loggers(trainer)
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial, weights_only=False)  # the full state: a resume needs it
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        trainer.strategy.barrier("last_checkpoint")


def flush_loggers(trainer: L.Trainer) -> None:
    """Write what the loggers hold in memory (the CSV logger's rows) to their files."""
    for logger in trainer.loggers:
        logger.save()


class WandbPredictionTable(Callback):
    """At every validation, a `wandb.Table` (key `val/predictions`) of the first `max_samples` samples:
    the canvas with ground-truth (green) and predicted (red) boxes, the phrase, the IoU and the hit.

    Does nothing without a WandbLogger; on several processes, rank 0 logs the samples of its share.
    """

    COLUMNS = ["image", "phrase", "iou", "hit", "image_file"]

    def __init__(self, max_samples: int = 32, tile: int = 224) -> None:
        self.max_samples, self.tile = max_samples, tile
        self.rows: list[list[Any]] = []

    @staticmethod
    def wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows = []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        if outputs is None or len(self.rows) >= self.max_samples or not trainer.is_global_zero:
            return
        if self.wandb_logger(trainer) is None:
            return
        import wandb

        pred, gt = outputs.detach().float().cpu(), batch["box"].float().cpu()
        iou = canvas_iou(pred, gt)
        for i in range(min(len(pred), self.max_samples - len(self.rows))):
            image = canvas_with_boxes(batch["image"][i], gt[i], pred[i], self.tile)
            self.rows.append([wandb.Image(image), batch["phrase"][i], round(float(iou[i]), 4),
                              bool(iou[i] >= 0.5), batch["image_file"][i]])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self.wandb_logger(trainer)
        if logger is None or not self.rows or not trainer.is_global_zero:
            return
        logger.log_table("val/predictions", columns=self.COLUMNS, data=self.rows, step=trainer.global_step)
