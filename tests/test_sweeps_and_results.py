"""Sweeps write one results file; `python -m src.results` and the comparison notebook read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src import results
from src.config import CONFIG_DIR, compose
from src.run import run
from tests.conftest import PROJECT_ROOT
from tests.test_default_job import TINY_JOB

# The tiny job as command-line overrides for a sweep (no progress bar, no pictures, CSV only).
SWEEP_JOB = [*TINY_JOB[:-3], "trainer.max_epochs=1", "logger=csv", "visualize=0", "callbacks.progress_bar=null"]


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "src.run", "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}", *SWEEP_JOB]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def row(method: str, seed: int, acc: float, rank: int | None = 8, **extra) -> dict:
    return {"benchmark": "synthetic", "method": method, "rank": rank, "peft": {"rank": rank}, "mode": "clean",
            "seed": seed, "tunable_backbone": 100, "tunable_backbone_pct": 1.0, "splits": {"test": {"acc50": acc,
            "miou": acc / 2, "n": 10}}, "shuffled_text": {"test": 0.1}, "output_dir": f"{method}-{seed}-{rank}",
            "wall_seconds": 1.0, **extra}


def test_summary_groups_seeds_and_keeps_settings_apart():
    rows = [row("lora", 1, 0.5), row("lora", 2, 0.7), row("lora", 1, 0.9, rank=32), row("adapter", 1, 0.2),
            row("adapter", 2, 0.3, status="failed")]
    entries = {(e["method"], e["rank"]): e for e in results.summarise(rows)}
    assert set(entries) == {("lora", 8), ("lora", 32), ("adapter", 8)}
    lora = entries[("lora", 8)]
    assert lora["runs"] == 2 and lora["seeds"] == [1, 2]
    assert lora["acc50/test"] == pytest.approx(0.6) and lora["acc50/test_std"] == pytest.approx(0.1414, abs=1e-4)
    assert entries[("adapter", 8)]["runs"] == 1  # the failed run is not averaged in
    table = results.format_table(list(entries.values()))
    assert "0.600 ± 0.141" in table and "| lora | 32 |" in table
    csv_text = results.format_table(list(entries.values()), "csv")
    assert csv_text.splitlines()[0].startswith("benchmark,method,mode,settings,rank,runs")


def test_results_lines_are_read_once_from_files_and_folders(tmp_path: Path):
    path = tmp_path / "a" / results.RESULTS_NAME
    results.append_result(path, row("lora", 1, 0.5))
    results.append_result(path, row("lora", 2, 0.6))
    assert len(results.load_results([tmp_path, path])) == 2


@pytest.mark.slow
def test_method_rank_seed_sweep_feeds_the_table_and_the_notebook(tmp_path: Path, capsys):
    sweep(tmp_path, "peft=lora,adapter", "peft.rank=4,8", "seed=1,2")
    lines = (tmp_path / "sweep" / results.RESULTS_NAME).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert sorted((r["method"], r["rank"], r["seed"]) for r in rows) == sorted(
        (m, k, s) for m in ("lora", "adapter") for k in (4, 8) for s in (1, 2))
    for r in rows:
        assert r["status"] == "ok" and r["benchmark"] == "synthetic" and r["git_commit"]
        assert r["checkpoint_bytes"] > 0 and r["best_epoch"] == 0 and r["peak_memory_bytes"] > 0
        assert 0 <= r["splits"]["test"]["acc50"] <= 1 and "test" in r["shuffled_text"]
        assert r["tunable_backbone"] > 0 and r["trainable"] > r["tunable_backbone"]
    assert results.main([str(tmp_path / "sweep")]) == 0
    table = capsys.readouterr().out
    assert sum(line.startswith("| synthetic |") for line in table.splitlines()) == 4

    notebook = PROJECT_ROOT / "notebooks" / "compare_petl.ipynb"
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(notebook, as_version=4)
    figure = tmp_path / "figure.png"
    os.environ["PETL_RESULTS"], os.environ["PETL_FIGURE"] = str(tmp_path / "sweep"), str(figure)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(notebook.parent)}}).execute()
    finally:
        del os.environ["PETL_RESULTS"], os.environ["PETL_FIGURE"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o.data.get("text/markdown", "") for o in outputs if "data" in o)
    assert "| synthetic | lora | 4 |" in markdown and "| synthetic | adapter | 8 |" in markdown
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert figure.stat().st_size > 10_000
    assert "8 runs, 4 configurations" in "".join(o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_optuna_search_over_rank_and_learning_rate(tmp_path: Path):
    sweep(tmp_path, "hparams_search=optuna", "peft=lora", "hydra.sweeper.n_trials=2")
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"peft.rank", "optim.optimizer.lr"}
    rows = results.load_results([tmp_path / "sweep"])
    assert len(rows) == 2 and all(r["method"] == "lora" and r["rank"] in (4, 8, 16, 32, 64) for r in rows)


def test_hparams_search_and_debug_configs_compose():
    cfg = compose(["hparams_search=optuna", "peft=adapter"])
    assert cfg.task_name == "optuna" and cfg.peft.rank == 32
    for name in sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml")):
        cfg = compose([f"debug={name}"])
        assert cfg.task_name.startswith("debug")
    assert compose(["debug=fast_dev_run"]).trainer.fast_dev_run is True
    assert compose(["debug=overfit"]).trainer.overfit_batches == 4


def test_fast_dev_run_debug_mode_runs_end_to_end(tmp_path: Path):
    cfg = compose([f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", *TINY_JOB,
                   "debug=fast_dev_run", "logger=csv"])
    run(cfg)
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["splits"]["test"]["n"] > 0
    assert (tmp_path / "run" / results.RESULTS_NAME).exists()


@pytest.mark.slow
def test_a_diverging_job_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path: Path):
    sweep(tmp_path, "optim.optimizer.lr=1e38,1e-3")  # LR 1e38 makes the weights, then the loss, non-finite
    rows = [json.loads(line) for line in (tmp_path / "sweep" / results.RESULTS_NAME).read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["reason"].startswith("non-finite loss at global step")
    assert json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())["status"] == "failed"
    assert [e["runs"] for e in results.summarise(rows)] == [1]  # failed runs are not averaged in


@pytest.mark.slow
def test_a_sweep_whose_jobs_run_ddp_gives_one_job_per_point_each_on_two_processes(tmp_path: Path):
    from tests.test_distributed import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    try:
        proc = sweep(tmp_path, "seed=1,2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     "shuffled_text_check=false")
    finally:
        del os.environ["MASTER_PORT"]
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert folders == ["0", "1"], folders  # no job folders from the re-launched processes
    rows = [json.loads(line) for line in (tmp_path / "sweep" / results.RESULTS_NAME).read_text().splitlines()]
    assert [(r["seed"], r["processes"], r["status"]) for r in rows] == [(1, 2, "ok"), (2, 2, "ok")]
    for job in folders:  # each job's second process wrote its own log in the job's folder
        assert (tmp_path / "sweep" / job / "train_ddp_process_1.log").exists(), proc.stderr[-2000:]
        assert json.loads((tmp_path / "sweep" / job / "results.json").read_text())["status"] == "ok"
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "sweep")], capture_output=True, text=True)
    assert not leftover.stdout.strip(), "a process of the sweep is still alive"
