"""Progress lines for log files: the throttled `Progress` lines, the pretraining stages, sample caching, the data
doctor, and the training lines of a tiny run whose output goes to a pipe (as to a log file)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from PIL import Image

from src import progress
from src.data.check import check_images
from src.data.dataset import CachedSamples, RecordDataset
from src.data.records import Record
from src.pretraining.vision import VisionPretraining, ensure_pretrained_vit
from src.training.callbacks import ProgressLog
from tests.conftest import PROJECT_ROOT
from tests.test_default_job import TINY_JOB
from tests.test_pretrain_vision import SIZE, VISION, synthetic


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_every_interval_with_speed_and_time_left() -> None:
    lines, clock = [], Clock()
    bar = progress.Progress("stage", 100, lines.append, every_s=10, clock=clock)
    for step in range(1, 101):
        clock.now += 0.5  # 2 steps/s: a line every 20 steps
        bar.update(step, loss=1 / step)
    assert len(lines) == 5
    assert lines[0] == "stage: 20/100 steps (20%), loss 0.05, 2 steps/s, 40 s left"
    assert lines[-1] == "stage: 100/100 steps (100%), loss 0.01, 2 steps/s"  # done: no time left


def test_every_n_items_and_a_loop_shorter_than_the_interval() -> None:
    lines, clock = [], Clock()
    bar = progress.Progress("caching val", 10, lines.append, unit="samples", every_n=4, clock=clock)
    for i in range(1, 11):
        clock.now += 0.01
        bar.update(i)
    assert [line.split(",")[0] for line in lines] == [f"caching val: {i}/10 samples ({10 * i}%)" for i in (4, 8)]
    quiet: list[str] = []
    short = progress.Progress("short", 10, quiet.append)  # the real clock, 10 s interval: nothing to say
    for i in range(1, 11):
        short.update(i)
    assert quiet == []


def test_durations_read_like_a_person_would_write_them() -> None:
    assert [progress.duration(s) for s in (0.4, 42, 185, 3725)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_the_pretraining_stage_logs_steps_losses_and_time_left(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line per step
    caplog.set_level(logging.INFO, logger="src.pretraining.vision")
    ensure_pretrained_vit(synthetic(tmp_path), VISION, SIZE, VisionPretraining(steps=3, batch_size=4), tmp_path / "c")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vision pretraining: ")]
    assert len(lines) == 3 + 1  # one per step, then the stage's summary
    assert re.fullmatch(r"vision pretraining: 1/3 steps \(33%\), colour [\d.]+, shape [\d.]+, box [\d.]+, "
                        r"[\d.e+]+ steps/s, \d+ s left", lines[0]), lines[0]


def test_sample_caching_and_the_data_doctor_report_progress(tmp_path: Path, monkeypatch, caplog, capsys) -> None:
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="src.data.dataset")
    samples = [{"image": torch.zeros(3, 4, 4), "index": i} for i in range(3)]
    assert len(CachedSamples(samples, what="caching train")) == 3  # a list is a map-style dataset
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        f"caching train: {i}/3 samples ({100 * i / 3:.0f}%)" for i in (1, 2, 3)]
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    records = [Record(name, (0.0, 0.0, 4.0, 4.0), "x") for name in ("a.png", "b.png", "gone.png")]
    dataset = RecordDataset(records, tmp_path, None, None, None, 8)
    assert check_images(dataset, -1, "data doctor: train").missing == ["gone.png"]
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == [f"data doctor: train: {i}/3 images ({100 * i / 3:.0f}%)"
                                                     for i in (1, 2, 3)]


def test_training_lines_leave_a_terminal_with_the_rich_bar_alone(monkeypatch) -> None:
    callback = ProgressLog()
    rich, tqdm = SimpleNamespace(progress_bar_callback=RichProgressBar()), SimpleNamespace(
        progress_bar_callback=TQDMProgressBar())
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(isatty=lambda: True))
    assert not callback.wanted(rich) and callback.wanted(tqdm)
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(isatty=lambda: False))  # a log file: the rich bar shows
    # nothing there until it ends
    assert callback.wanted(rich)
    assert not ProgressLog(active="never").wanted(tqdm) and ProgressLog(active="always").wanted(rich)


def test_long_evaluation_loops_report_batches_done(caplog) -> None:
    caplog.set_level(logging.INFO, logger="src.training.callbacks")
    callback = ProgressLog(every_s=1e-9, active="always")  # a line per batch
    trainer = SimpleNamespace(is_global_zero=True, progress_bar_callback=None, num_test_batches=[2, 3],
                              num_val_batches=[float("inf")], sanity_checking=False)
    callback.setup(trainer, None, "test")
    module = SimpleNamespace(test_split_names=["testA", "testB"])
    for loader, batches in enumerate((2, 3)):
        for i in range(batches):
            callback.on_test_batch_end(trainer, module, None, None, i, loader)
    callback.on_validation_batch_end(trainer, module, None, None, 0)
    lines = [r.getMessage().split(",")[0] for r in caplog.records]
    assert lines == ["test testA: 1/2 batches (50%)", "test testA: 2/2 batches (100%)", "test testB: 1/3 batches (33%)",
                     "test testB: 2/3 batches (67%)", "test testB: 3/3 batches (100%)", "validation: 1 batches"]


@pytest.mark.slow
def test_a_tiny_run_writes_training_progress_to_its_log(tmp_path: Path) -> None:
    """`python -m src.run > log`: stdout is a pipe, the rich progress bar configured as usual."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    job = [o for o in TINY_JOB if not o.startswith("callbacks.progress_bar")]
    cmd = [sys.executable, "-m", "src.run", *job, f"paths.cache_dir={tmp_path / 'cache'}",
           f"hydra.run.dir={tmp_path / 'run'}", "logger=csv", "visualize=0", "shuffled_text_check=false",
           "callbacks.progress_log.every_n_steps=2"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = re.findall(r"train: epoch \d/2, step (\d+)/12 \(\d+%\), loss [\d.]+, [\d.e+]+ steps/s \(\d+ samples/s\), "
                       r"\d+ s left", proc.stdout)
    assert steps == ["2", "4", "6", "8", "10", "12"], proc.stdout  # 6 steps per epoch, a line every 2 steps
    epochs = re.findall(r"train: epoch (\d)/2 done: 6 steps in \d+ s \([\d.e+]+ steps/s, \d+ samples/s\), then "
                        r"validation \d+ s, mean loss [\d.]+, val/acc50 [\d.]+, val/miou [\d.]+, val/loss [\d.]+, "
                        r"\d+ s left", proc.stdout)
    assert epochs == ["1", "2"], proc.stdout
    assert "train: epoch 2/2 done" in (tmp_path / "run" / "run.log").read_text()  # Hydra's log file has them too
