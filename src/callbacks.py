"""Training callbacks of the suite: the `last` checkpoint that makes any run resumable after a kill."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class LastCheckpoint(Callback):
    """Write `<dirpath>/last.ckpt` every `every_n_steps` optimiser steps and at every epoch end.

    The file is written beside the target and moved over it in one step (`os.replace`), so a run
    killed while saving leaves the previous `last.ckpt` intact. `python -m src.run ... ckpt_path=last`
    resumes from it.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 200, filename: str = "last.ckpt") -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer, force=True)

    def save(self, trainer: L.Trainer, force: bool = False) -> None:
        """Atomically replace the last checkpoint (once per step unless `force`, e.g. at an epoch end)."""
        if trainer.sanity_checking or (trainer.global_step == self._saved_step and not force):
            return
        self._saved_step = trainer.global_step
        partial = self.path.with_name(self.path.name + ".partial")
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        trainer.strategy.barrier("last_checkpoint")
