"""Training callbacks of the suite: the `last` checkpoint that makes any run resumable after a kill, the W&B
table of validation predictions, and plain progress lines for log files."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, RichProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from src.errors import ConfigError
from src.progress import Progress, duration
from src.training.metrics import canvas_iou
from src.training.report import canvas_with_boxes
from src.training.resume import check_processes

log = logging.getLogger(__name__)


class LastCheckpoint(Checkpoint):
    """Write `<dirpath>/last.ckpt` every `every_n_steps` optimiser steps inside an epoch and at every epoch end.

    The file is written beside the target and moved over it in one step (`os.replace`), so a run
    killed while saving leaves the previous `last.ckpt` intact. `python -m src.run ... ckpt_path=last`
    resumes from it. It is a `Checkpoint` that runs after every other callback (see `setup`): Lightning calls the
    epoch-end hook of the checkpointing callbacks after the others', and the best-checkpoint tracker records the
    epoch there, so the epoch-end `last.ckpt` carries that record (saved before it, a resumed run forgot the best).
    Loggers are flushed before each save, and again at the next step, so their files hold every row up to the save.
    Not `ModelCheckpoint(save_last=True, every_n_train_steps=...)`: that `last.ckpt` is written from the tracker's
    own hooks, where a resumed run was seen to forget its best checkpoint (tests/test_resume.py); this class
    orders its save after the tracker's update explicitly.
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
    """At every validation, a `wandb.Table` (key `val/predictions`) of the first `max_samples` samples: the
    canvas with ground-truth (green) and predicted (red) boxes, the phrase, the IoU and the hit; and the same
    canvases as a list of images (key `val/prediction_images`, captioned with phrase and IoU).

    Why both: W&B (0.31 and earlier) writes a table logged to a run twice, as the run's own table file, in which
    every image cell is only its class name ("Image"), and as a `run_table` artifact holding the images, whose
    files it stages outside the run folder (in its data folder, `~/.local/share/wandb/artifacts/staging`) until
    the run is synced. The image list is copied into the run folder (`files/media/images/val/`), so an offline
    run holds its pictures, and a copied or archived run folder keeps them.
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
            score, phrase = round(float(iou[i]), 4), batch["phrase"][i]
            self.rows.append([wandb.Image(image, caption=f"{phrase} (IoU {score:.2f})"), phrase, score,
                              bool(iou[i] >= 0.5), batch["image_file"][i]])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self.wandb_logger(trainer)
        if logger is None or not self.rows or not trainer.is_global_zero:
            return
        import wandb

        table = wandb.Table(columns=self.COLUMNS, data=self.rows)
        images = [row[0] for row in self.rows]
        logger.log_metrics({"val/predictions": table, "val/prediction_images": images}, step=trainer.global_step)


class ProgressLog(Callback):
    """Plain progress lines, for log files. Training: every `every_n_steps` optimiser steps or `every_s` seconds,
    whichever comes first, the step, loss, speed and time left; at every epoch end, the epoch's steps, speed and
    mean loss, the validation's duration and metrics, and time left. Validation and test loops that take longer
    than `every_s` (real benchmarks on a CPU): every `every_s` seconds, the batches done, speed and time left.

    `active="auto"` writes them when stdout is not a terminal (a log file gets nothing from a live progress bar
    until it ends) or when no rich progress bar is shown; a terminal's bar is left alone. `"always"`, `"never"`.
    The loss is read on the host only for the lines written (no host sync on other steps); rank 0 only.
    """

    def __init__(self, every_n_steps: int = 100, every_s: float = 60.0, active: str = "auto") -> None:
        if every_n_steps < 1 or every_s <= 0:
            raise ConfigError(f"every_n_steps must be >= 1 and every_s > 0, got {every_n_steps} and {every_s}")
        if active not in ("auto", "always", "never"):
            raise ConfigError(f"active must be auto, always or never, got {active!r}")
        self.every_n_steps, self.every_s, self.active = every_n_steps, every_s, active
        self.enabled = False

    def wanted(self, trainer: L.Trainer) -> bool:
        """Whether this trainer's output needs the lines (see the class docstring)."""
        if self.active != "auto":
            return self.active == "always"
        return not sys.stdout.isatty() or not isinstance(trainer.progress_bar_callback, RichProgressBar)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.enabled = trainer.is_global_zero and self.wanted(trainer)
        self.loops: dict[tuple[str, int], Progress] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self.last = time.monotonic()
        self.first_step = self.last_step = trainer.global_step  # a resumed run starts past 0
        self.samples = 0
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed inside an epoch gets no call for it

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the epoch's figures."""
        self.epoch_start, self.epoch_first_step = time.monotonic(), trainer.global_step
        self.loss_sum: torch.Tensor | None = None
        self.batches = self.epoch_samples = 0
        self.batch_end = self.epoch_start

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a batch of skipped records: no step
            return
        loss = loss.detach()  # Lightning hands over loss / accumulate_grad_batches: multiplied back when shown
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.batches += 1
        size = len(batch.get("phrase", ())) if isinstance(batch, dict) else 0
        self.samples, self.epoch_samples = self.samples + size, self.epoch_samples + size
        step = trainer.global_step
        now = self.batch_end = time.monotonic()
        if step == self.last_step or (step % self.every_n_steps and now - self.last < self.every_s):
            return
        rate = (step - self.last_step) / max(now - self.last, 1e-9)
        per_step = self.samples / max(step - self.first_step, 1)
        total = trainer.estimated_stepping_batches
        where = f"step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if math.isfinite(total) else "")
        log.info("train: %s, %s, loss %.4f, %.3g steps/s (%.0f samples/s)%s", self.epoch_label(trainer), where,
                 float(loss) * trainer.accumulate_grad_batches, rate, rate * per_step, self.time_left(trainer, now))
        self.last, self.last_step = now, step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the epoch's validation (Lightning runs it before this hook): the epoch's figures."""
        if not self.enabled or not self.batches:
            return
        now = time.monotonic()
        seconds = max(self.batch_end - self.epoch_start, 1e-9)  # its training batches; validation came after
        steps = trainer.global_step - self.epoch_first_step
        metrics = trainer.callback_metrics
        shown = ", ".join(f"{key} {float(metrics[key]):.4f}" for key in ("val/acc50", "val/miou", "val/loss")
                          if key in metrics)
        log.info("train: %s done: %d steps in %s (%.3g steps/s, %.0f samples/s), then validation %s, mean loss %.4f"
                 "%s%s", self.epoch_label(trainer), steps, duration(seconds), steps / seconds,
                 self.epoch_samples / seconds, duration(now - self.batch_end),
                 float(self.loss_sum) * trainer.accumulate_grad_batches / self.batches, f", {shown}" if shown else "",
                 self.time_left(trainer, now))
        self.last = now

    @staticmethod
    def epoch_label(trainer: L.Trainer) -> str:
        """`epoch 3/14` (1-based), without the total when training is bounded by steps only."""
        epochs = trainer.max_epochs
        return f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")

    def time_left(self, trainer: L.Trainer, now: float) -> str:
        """`, 2 min 30 s left` at the average pace since training started (validations included)."""
        total, done = trainer.estimated_stepping_batches, trainer.global_step - self.first_step
        if not math.isfinite(total) or done <= 0:
            return ""
        return f", {duration((total - trainer.global_step) * (now - self.start) / done)} left"

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.enabled and not trainer.sanity_checking:
            self.evaluation(trainer.num_val_batches, "validation", batch_idx, dataloader_idx)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.enabled:
            names = getattr(pl_module, "test_split_names", None) or []
            name = f"test {names[dataloader_idx]}" if dataloader_idx < len(names) else "test"
            self.evaluation(trainer.num_test_batches, name, batch_idx, dataloader_idx)

    def evaluation(self, totals: list[int | float], what: str, batch_idx: int, dataloader_idx: int) -> None:
        """A line every `every_s` seconds of an evaluation loop (none for a loop that ends sooner)."""
        key = (what, dataloader_idx)
        if batch_idx == 0 or key not in self.loops:  # a new pass over this loader
            total = totals[dataloader_idx]
            self.loops[key] = Progress(what, int(total) if math.isfinite(total) else 0, log.info, unit="batches",
                                       every_s=self.every_s)
        self.loops[key].update(batch_idx + 1)
