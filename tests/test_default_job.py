"""Smoke tests of the default job (`python -m src.run`) with a tiny budget, and of a Hydra sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.config import compose
from src.run import run
from tests.conftest import PROJECT_ROOT

TINY_JOB = [
    "vision_pretraining.steps=5", "vision_pretraining.batch_size=4", "text_pretraining.steps=3",
    "text_pretraining.batch_size=4", "pretraining_corpus.scenes=8",
    "data.synthetic.n_train=24", "data.synthetic.n_val=6", "data.synthetic.n_test=6", "data.num_workers=0",
    "data.batch_size=8", "trainer.max_epochs=2", "visualize=4", "callbacks.progress_bar=null",
]


def test_default_job_writes_every_artefact(tmp_path: Path):
    cfg = compose([f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", *TINY_JOB])
    best = run(cfg)
    out = tmp_path / "run"
    assert best is not None and 0.0 <= best <= 1.0
    results = json.loads((out / "results.json").read_text())
    assert set(results["splits"]) == set(cfg.data.test_splits)
    for split, m in results["splits"].items():
        assert 0.0 <= m["acc50"] <= 1.0 and 0.0 <= m["miou"] <= 1.0 and m["n"] > 0
        assert 0.0 <= results["shuffled_text"][split]["acc50"] <= 1.0
    assert results["wall_seconds"] > 0
    assert results["parameters"]["tunable_backbone"] > 0
    assert results["config"]["model"]["mode"] == "clean"
    assert results["quirks"] and not any(results["quirks"].values())  # clean mode: every quirk off
    for backbone in ("vision", "text", "prior"):  # the pretraining stages ran
        assert Path(results["config"]["model"][backbone]["init_checkpoint"]).exists()
    assert (out / "predictions.png").stat().st_size > 0
    assert list((out / "checkpoints").glob("*.ckpt"))
    metrics_csv = (out / "csv" / "metrics.csv").read_text()
    assert "val/acc50" in metrics_csv and "train/loss" in metrics_csv
    assert list((out / "wandb").glob("offline-run-*")), "an offline W&B run is written"


@pytest.mark.slow
def test_cli_multirun_sweeps_two_jobs(tmp_path: Path):
    env = {**os.environ, "REC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "src.run", "-m", "trainer.max_epochs=1,2", "logger=csv", "visualize=0",
           "shuffled_text_check=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", *TINY_JOB[:-3]]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2
    epochs = sorted(json.loads(p.read_text())["config"]["trainer"]["max_epochs"] for p in results)
    assert epochs == [1, 2]


@pytest.mark.slow
def test_official_mode_runs_from_a_cache_filled_by_a_clean_run(tmp_path: Path):
    job = [f"paths.cache_dir={tmp_path / 'cache'}", *TINY_JOB, "logger=csv", "visualize=0", "test=false",
           "trainer.max_epochs=1", "shuffled_text_check=false"]
    run(compose([*job, f"paths.output_dir={tmp_path / 'clean'}"]))
    run(compose([*job, f"paths.output_dir={tmp_path / 'official'}", "model.mode=official"]))
    bert_caches = sorted((tmp_path / "cache").glob("bert-synthetic-*.pt"))
    assert len(bert_caches) == 2  # the official BERT (no token-type table) has a pretraining of its own
