"""Never lose a run: SIGKILL a training run mid-epoch, resume it with `ckpt_path=last`, get the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.errors import ConfigError
from src.resume import comparable, find_last_checkpoint
from tests.conftest import PROJECT_ROOT
from tests.test_default_job import TINY_JOB

# 4 epochs of 6 steps; `last.ckpt` only at epoch ends (every_n_steps larger than the run).
JOB = [*TINY_JOB[:-3], "trainer.max_epochs=4", "logger=csv", "visualize=0", "callbacks.progress_bar=null",
       "callbacks.last_checkpoint.every_n_steps=1000", "seed=3", "shuffled_text_check=false"]


def launch(tmp_path: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "REC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "src.run", *JOB, f"hydra.run.dir={run_dir}",
           f"resume_roots=[{tmp_path / 'killed'}]", *extra]
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path):
    finish(launch(tmp_path, tmp_path / "whole"))  # also fills the cache for the runs below
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())

    killed = launch(tmp_path, tmp_path / "killed" / "run")
    last = tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and killed.poll() is None:  # kill once epoch 1 is saved, mid-epoch 2
        if last.exists() and torch.load(last, weights_only=True)["epoch"] >= 1:
            os.kill(killed.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "run" / "results.json").exists()
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] < 3 and saved["global_step"] < 24

    out = finish(launch(tmp_path, tmp_path / "resumed", "ckpt_path=last"))
    assert f"resuming from {last}" in out
    continued = tmp_path / "killed" / "run"  # the resumed run continues in the killed run's folder
    resumed = json.loads((continued / "results.json").read_text())
    final = {name: torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
             for name, folder in (("whole", tmp_path / "whole"), ("resumed", continued))}
    assert final["whole"]["global_step"] == final["resumed"]["global_step"] == 24
    diffs = {k: (v - final["resumed"]["state_dict"][k]).abs().max().item()
             for k, v in final["whole"]["state_dict"].items() if v.is_floating_point()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] == 0.0, (worst, diffs[worst])  # bit-identical training
    assert resumed["splits"] == whole["splits"]
    assert resumed["best_val_acc50"] == whole["best_val_acc50"]


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
