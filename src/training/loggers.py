"""Logger factories used by the Hydra configs."""

from __future__ import annotations

import csv
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only


def wandb_mode() -> str:
    """`WANDB_MODE` if set; otherwise online when W&B credentials exist, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"
    return "online" if rc.authenticators("api.wandb.ai") else "offline"


def wandb_logger(save_dir: str, **kwargs: Any) -> WandbLogger:
    """A W&B logger writing under the run folder, online only when W&B is configured.

    The run's W&B id is kept in the folder (`wandb/run_id`), so that a run resumed there (`ckpt_path=last`)
    continues the same W&B run instead of starting another.
    """
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    id_file = Path(save_dir) / "wandb" / "run_id"
    configured = kwargs.pop("id", None)
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = configured or uuid.uuid4().hex[:16]
        if rank_zero_only.rank == 0:
            id_file.parent.mkdir(exist_ok=True)
            id_file.write_text(run_id + "\n")
    return WandbLogger(save_dir=save_dir, mode=wandb_mode(), id=run_id, resume="allow", **kwargs)


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        """Keep an earlier metrics.csv and its columns (Lightning deletes it here)."""
        self._trim = self._fs.isfile(self.metrics_file_path)
        if self._trim:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def save(self) -> None:
        """Append the rows logged since the last save. The first time, drop the file's rows of the steps they log
        again: a resumed run replays the steps after its checkpoint, and their rows would otherwise appear twice."""
        if self._trim and self.metrics:
            first = min(int(row["step"]) for row in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                kept = [row for row in csv.DictReader(file) if int(row["step"]) < first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._trim = False
        super().save()


class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSVLogger, continuing the folder's metrics.csv: a resumed run keeps the rows of its first part."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer, created on first use."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(log_dir=self.log_dir)
        return self._experiment


def finish_wandb() -> None:
    """Close the process's W&B run, if any: its files are complete on disk, and the next run of a sweep
    in the same process gets a run of its own (Lightning's WandbLogger would otherwise reuse this one)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
