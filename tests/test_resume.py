"""Never lose a run: SIGKILL a training run right after an epoch-end save and again inside an epoch, resume it each
time with `ckpt_path=last`, and get the uninterrupted run's weights, best checkpoint, test metrics and metrics.csv;
plus the pieces that make it so (the resumable train loader, the continued logs, the moved Hydra files)."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from src.data.resumable import ResumableLoader, ResumableSampler
from src.errors import ConfigError
from src.training.loggers import ContinuedCSVLogger, wandb_logger
from src.training.resume import check_processes, comparable, find_last_checkpoint, move_invocation
from tests.conftest import PROJECT_ROOT
from tests.test_default_job import TINY_JOB

# 4 epochs of 6 steps, `last.ckpt` every 4 steps (4, 8, 16, 20: not 12 and 24, epoch ends) and at every epoch end.
# Acc@0.5 stays 0 in so few steps, so the best checkpoint is kept by val mean IoU, which falls after epoch 0 here:
# the best epoch is not the last one, and a resumed run must remember it.
JOB = [*TINY_JOB[:-3], "trainer.max_epochs=4", "logger=csv", "visualize=0", "callbacks.progress_bar=null",
       "callbacks.last_checkpoint.every_n_steps=4", "callbacks.model_checkpoint.monitor=val/miou", "seed=3",
       "shuffled_text_check=false"]
KILLER = "+callbacks.kill._target_=tests.test_resume.KillAt"


class KillAt(Callback):
    """SIGKILL this process right after a save: at the start of epoch `epoch` (the previous epoch's end was saved),
    or in the step after global step `step` (saved at its end), once that step's logged rows are flushed."""

    def __init__(self, epoch: int | None = None, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def launch(tmp_path: Path, run_dir: Path, *extra: str, job: list[str] = JOB) -> subprocess.CompletedProcess:
    env = {**os.environ, "REC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "src.run", *job, f"hydra.run.dir={run_dir}", f"resume_roots=[{tmp_path / 'killed'}]",
           *extra]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)


def killed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]


def finished(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path):
    finished(launch(tmp_path, tmp_path / "whole"))  # also fills the cache for the runs below
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert Path(whole["best_checkpoint"]).name != "best-epoch003.ckpt"  # the best epoch is not the last

    run = tmp_path / "killed" / "run"
    last = run / "checkpoints" / "last.ckpt"
    killed(launch(tmp_path, run, KILLER, "+callbacks.kill.epoch=1"))  # right after epoch 0's end was saved
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"], saved["processes"]) == (0, 6, 1)

    killed(launch(tmp_path, tmp_path / "resume1", "ckpt_path=last", KILLER, "+callbacks.kill.step=16"))
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (2, 16)  # saved inside epoch 2 (its steps are 13-18)
    assert saved["GroundingDataModule"]["train_loader"]["batches"] == 4  # where the train loader stood

    out = finished(launch(tmp_path, tmp_path / "resume2", "ckpt_path=last"))
    assert f"resuming from {last}" in out
    resumed = json.loads((run / "results.json").read_text())  # the resumed run continues in the killed run's folder
    assert torch.load(last, weights_only=True)["global_step"] == 24
    same_weights(tmp_path / "whole", run)
    assert Path(resumed["best_checkpoint"]).name == Path(whole["best_checkpoint"]).name
    assert resumed["best_val_acc50"] == whole["best_val_acc50"]
    assert resumed["splits"] == whole["splits"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    # every row logged before the kills is kept, none twice: the same file as the uninterrupted run's
    assert (run / "csv" / "metrics.csv").read_text() == (tmp_path / "whole" / "csv" / "metrics.csv").read_text()
    # no stray folder: each resuming invocation's log and Hydra config moved into the run's folder
    assert not (tmp_path / "resume1").exists() and not (tmp_path / "resume2").exists()
    for name in ("resume1", "resume2"):
        assert "ckpt_path=last" in (run / "resumes" / name / ".hydra" / "overrides.yaml").read_text()
        assert f"resuming from {last}" in (run / "resumes" / name / "run.log").read_text()


def same_weights(a: Path, b: Path) -> None:
    """The two runs' final `last.ckpt` hold bit-identical weights."""
    first, second = (torch.load(p / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for p in (a, b))
    assert first.keys() == second.keys()
    assert all(torch.equal(v, second[k]) for k, v in first.items())


@pytest.mark.slow
def test_ddp_run_resumes_inside_an_epoch_on_as_many_processes_only(tmp_path: Path):
    # 2 CPU processes (gloo), 3 epochs of 6 steps of 2 x 4 samples; killed after the save at step 8 (epoch 1)
    job = [*JOB, "trainer.max_epochs=3", "data.batch_size=4", "trainer.accelerator=cpu", "trainer.strategy=ddp",
           "trainer.devices=2"]
    finished(launch(tmp_path, tmp_path / "whole", job=job))
    run = tmp_path / "killed" / "run"
    killed(launch(tmp_path, run, KILLER, "+callbacks.kill.step=8", job=job))
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"], saved["processes"]) == (1, 8, 2)

    refused = launch(tmp_path, tmp_path / "one", "ckpt_path=last", "trainer.devices=1", job=job)
    assert refused.returncode != 0
    assert "saved by a run on 2 processes" in refused.stdout + refused.stderr

    finished(launch(tmp_path, tmp_path / "resume", "ckpt_path=last", job=job))
    same_weights(tmp_path / "whole", run)
    assert (run / "csv" / "metrics.csv").read_text() == (tmp_path / "whole" / "csv" / "metrics.csv").read_text()
    assert not (tmp_path / "one").exists() and not (tmp_path / "resume").exists()
    assert (run / "resumes" / "resume" / "train_ddp_process_1.log").is_file()  # the other process's log too


def test_last_checkpoint_is_found_only_for_the_same_settings(tmp_path: Path):
    config = {"task_name": "t", "model": {"vision": {"init_checkpoint": "a.pt", "depth": 2}}, "peft": {"rank": 8},
              "data": {}, "optim": {}, "loss": {}, "seed": 1}
    older, newer = tmp_path / "a" / "last.ckpt", tmp_path / "b" / "last.ckpt"
    for path, seed in ((older, 1), (newer, 2)):
        path.parent.mkdir()
        torch.save({"config": {**config, "seed": seed}}, path)
    moved = {**config, "model": {"vision": {"init_checkpoint": "elsewhere.pt", "depth": 2}}}
    assert comparable(moved) == comparable(config)  # derived init files do not matter
    assert find_last_checkpoint(moved, [tmp_path]) == older
    assert find_last_checkpoint({**config, "seed": 2}, [tmp_path]) == newer
    with pytest.raises(ConfigError, match="none of the 2 last.ckpt"):
        find_last_checkpoint({**config, "peft": {"rank": 4}}, [tmp_path])


# ---------------------------------------------------------------------------------------------- pieces, in process

def loader(size: int, processes: int, rank: int, shuffle: bool, workers: int) -> ResumableLoader:
    """A train loader over the integers 0..size-1, as the datamodule builds it."""
    seed = None if processes == 1 else 7
    sampler = ResumableSampler(list(range(size)), num_replicas=processes, rank=rank, shuffle=shuffle, seed=seed)
    generator = torch.Generator().manual_seed(5) if workers else None  # as the datamodule gives workers their seeds
    return ResumableLoader(list(range(size)), batch_size=3, sampler=sampler, drop_last=True, num_workers=workers,
                           persistent_workers=workers > 0, generator=generator)


@pytest.mark.parametrize(("processes", "shuffle", "workers"), [(1, True, 0), (1, False, 0), (2, True, 0), (1, True, 2),
                                                               (2, False, 2)])
def test_resumed_loader_continues_with_the_next_batches(processes: int, shuffle: bool, workers: int):
    for rank in range(processes):
        torch.manual_seed(0)
        whole = loader(23, processes, rank, shuffle, workers)
        whole.sampler.set_epoch(1)
        batches = iter(whole)
        seen = [next(batches).tolist() for _ in range(2)]
        state = whole.state_dict()  # what a save after the second batch holds
        rest = [b.tolist() for b in batches]
        assert len(seen + rest) == len(whole) == -(-23 // processes) // 3  # shares padded as DistributedSampler

        resumed = loader(23, processes, rank, shuffle, workers)  # a new process: a fresh loader, another RNG state
        resumed.load_state_dict(state)
        torch.manual_seed(1)
        before = torch.get_rng_state()
        assert [b.tolist() for b in resumed] == rest
        assert torch.equal(torch.get_rng_state(), before)  # it drew nothing from torch's RNG: later draws match
        assert resumed.state_dict()["batches"] == len(whole)
        assert len([b for b in resumed]) == len(whole)  # the next epoch is whole again


def test_resumable_order_is_the_plain_loaders():
    """One process: a DataLoader's RandomSampler order (runs keep their data); several: DistributedSampler's."""
    torch.manual_seed(3)
    plain = [b.tolist() for _ in range(2) for b in DataLoader(list(range(20)), batch_size=4, shuffle=True)]
    torch.manual_seed(3)
    ours = ResumableLoader(list(range(20)), batch_size=4, sampler=ResumableSampler(list(range(20)), 1, 0, True, None))
    assert [b.tolist() for _ in range(2) for b in ours] == plain
    for rank in range(3):
        theirs = DistributedSampler(list(range(20)), num_replicas=3, rank=rank, shuffle=True, seed=7)
        mine = ResumableSampler(list(range(20)), num_replicas=3, rank=rank, shuffle=True, seed=7)
        theirs.set_epoch(2)
        mine.set_epoch(2)
        assert list(mine) == list(theirs)


def test_loader_state_of_another_loader_is_refused():
    whole = loader(23, 1, 0, True, 0)
    batches = iter(whole)
    next(batches)
    state = whole.state_dict()
    with pytest.raises(ConfigError, match=r"another train loader \(samples 23 -> 30\)"):
        loader(30, 1, 0, True, 0).load_state_dict(state)


def test_csv_logger_continues_the_file_and_drops_replayed_steps(tmp_path: Path):
    first = ContinuedCSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    resumed = ContinuedCSVLogger(tmp_path, name="csv", version="")  # resumed from a save at step 4
    resumed.log_metrics({"train/loss": 40.0, "val/acc50": 0.5}, step=4)
    resumed.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["step"], r["train/loss"], r["val/acc50"]) for r in rows] == [
        ("0", "0.0", ""), ("1", "1.0", ""), ("2", "2.0", ""), ("3", "3.0", ""), ("4", "40.0", "0.5")]


def test_wandb_run_id_is_kept_in_the_run_folder(tmp_path: Path):
    first = wandb_logger(str(tmp_path), project="p")
    again = wandb_logger(str(tmp_path), project="p")
    run_id = (tmp_path / "wandb" / "run_id").read_text().strip()
    assert first._wandb_init["id"] == again._wandb_init["id"] == run_id
    assert again._wandb_init["resume"] == "allow"


def moved_with_log(folder: Path, log_name: str, config_subdir: str | None, run_dir: Path) -> None:
    """Log a line into `folder/log_name`, move the invocation to `run_dir`, log another line."""
    handler = logging.FileHandler(folder / log_name)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        root.warning("before the move")
        move_invocation(folder, config_subdir, run_dir)
        root.warning("after the move")
    finally:
        root.removeHandler(handler)
        handler.close()


def test_resuming_invocation_files_move_into_the_run(tmp_path: Path):
    stray, run_dir = tmp_path / "outputs" / "2026-01-01_00-00-00", tmp_path / "run"
    (stray / ".hydra").mkdir(parents=True)
    (stray / ".hydra" / "overrides.yaml").write_text("- ckpt_path=last\n")
    moved_with_log(stray, "run.log", ".hydra", run_dir)
    moved = run_dir / "resumes" / stray.name
    assert not stray.exists()
    assert (moved / ".hydra" / "overrides.yaml").read_text() == "- ckpt_path=last\n"
    assert (moved / "run.log").read_text().splitlines() == ["before the move", "after the move"]

    stray.mkdir()  # DDP: the other process re-runs the command in the same folder, without a Hydra config folder
    moved_with_log(stray, "train_ddp_process_1.log", None, run_dir)
    assert not stray.exists() and (moved / "train_ddp_process_1.log").is_file()

    (stray / ".hydra").mkdir(parents=True)  # another invocation whose folder has the same name
    moved_with_log(stray, "run.log", ".hydra", run_dir)
    assert (run_dir / "resumes" / f"{stray.name}-1" / ".hydra").is_dir()
    assert (moved / "run.log").read_text().splitlines() == ["before the move", "after the move"]

    (tmp_path / "mine").mkdir()  # a folder holding other things is left, less what Hydra wrote
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "mine" / ".hydra").mkdir()
    move_invocation(tmp_path / "mine", ".hydra", run_dir)
    assert (tmp_path / "mine" / "notes.txt").exists() and not (tmp_path / "mine" / ".hydra").exists()
    assert (run_dir / "resumes" / "mine" / ".hydra").is_dir()


def test_another_number_of_processes_is_refused():
    check_processes(None, 2)  # a checkpoint from before processes were recorded
    check_processes(2, 2)
    with pytest.raises(ConfigError, match="saved by a run on 2 processes .* this run has 1"):
        check_processes(2, 1)
