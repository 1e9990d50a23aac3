"""Sweeps write one results file; `python -m src.results` and the comparison notebook read it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from src import results
from src.analysis import table as results_table
from src.analysis.samples import SAMPLES_FILE, read_hits, read_samples
from src.config import CONFIG_DIR, compose
from src.errors import ConfigError
from src.run import optimized_value, resolved, run, run_choices
from tests.conftest import PROJECT_ROOT
from tests.test_default_job import TINY_JOB

# The first synthetic study's lines (2026-11-30, 12 methods x 3 seeds), written before runs recorded their kind,
# recipe and per-sample outcomes: what an old results file looks like.
OLD_STUDY = Path(__file__).parent / "data" / "results_before_recipes.jsonl"
# The committed PETL study (experiments/petl_comparison/README.md), which the notebook reads by default.
STUDY = PROJECT_ROOT / "experiments" / "petl_comparison" / "results_synthetic_shift.jsonl"
# The tiny job as command-line overrides for a sweep (no progress bar, no pictures, CSV only).
SWEEP_JOB = [*TINY_JOB[:-3], "trainer.max_epochs=1", "logger=csv", "visualize=0", "callbacks.progress_bar=null"]


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "src.run", "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}", *SWEEP_JOB]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def row(method: str, seed: int, acc: float, rank: int | None = 8, **extra) -> dict:
    """A results line as written before kinds and recipes were recorded (a trained run: it has a val score)."""
    return {"benchmark": "synthetic", "method": method, "rank": rank, "peft": {"rank": rank}, "mode": "clean",
            "seed": seed, "tunable_backbone": 100, "tunable_backbone_pct": 1.0, "splits": {"test": {"acc50": acc,
            "miou": acc / 2, "n": 10}}, "shuffled_text": {"test": 0.1}, "output_dir": f"{method}-{seed}-{rank}",
            "wall_seconds": 1.0, "best_val_acc50": acc, **extra}


def line(out: Path, overrides: list[str], acc: float, choices: dict | None = None, **extra) -> dict:
    """The results line `src.run` writes for a run of `overrides` (its config resolved as a run resolves it)."""
    config = resolved(compose(overrides))
    return results_table.result_row(
        config, choices or {}, params={"tunable_backbone": 100, "tunable_backbone_pct": 1.0},
        splits={"test": {"acc50": acc, "miou": acc / 2, "n": 10}}, shuffled={}, best_val=acc, checkpoint=None,
        wall_seconds=acc, output_dir=out, **extra)


def test_summary_groups_seeds_and_keeps_settings_apart():
    rows = [row("lora", 1, 0.5), row("lora", 2, 0.7), row("lora", 1, 0.9, rank=32), row("adapter", 1, 0.2),
            row("adapter", 2, 0.3, status="failed")]
    entries = {(e["method"], e["rank"]): e for e in results_table.summarise(rows)}
    assert set(entries) == {("lora", 8), ("lora", 32), ("adapter", 8)}
    lora = entries[("lora", 8)]
    assert lora["runs"] == 2 and lora["seeds"] == [1, 2]
    assert lora["acc50/test"] == pytest.approx(0.6) and lora["acc50/test_std"] == pytest.approx(0.1414, abs=1e-4)
    assert entries[("adapter", 8)]["runs"] == 1  # the failed run is not averaged in
    table = results_table.format_table(list(entries.values()))
    assert "0.600 ± 0.141" in table and "| training | unknown | lora | 32 |" in table
    csv_text = results_table.format_table(list(entries.values()), "csv")
    assert csv_text.splitlines()[0].startswith("benchmark,kind,recipe,method,rank,mode,experiment,settings,runs")


def test_results_lines_are_read_once_from_files_and_folders(tmp_path: Path):
    path = tmp_path / "a" / results_table.RESULTS_NAME
    results_table.append_result(path, row("lora", 1, 0.5))
    results_table.append_result(path, row("lora", 2, 0.6))
    assert len(results_table.load_results([tmp_path, path])) == 2


def test_runs_are_grouped_only_with_runs_of_their_own_kind_and_recipe(tmp_path: Path, capsys):
    """Debug runs, evaluations re-run on one checkpoint and two recipes of 2 seeds each: one row per kind and
    recipe with the right run count, the setting that differs as a column, debug runs shown only when asked."""
    sweep, single = tmp_path / "multirun" / "sweep", tmp_path / "outputs"
    default = compose([]).trainer.max_epochs  # the default job's epochs; the other recipe trains 16
    # the configs two evaluated checkpoints carry; an evaluation takes its seed from its checkpoint
    trained = {seed: resolved(compose([f"seed={seed}"])) for seed in (1, 2)}
    lines = {
        sweep: [line(sweep / "0", ["seed=1"], 0.5), line(sweep / "1", ["seed=2"], 0.7),
                line(sweep / "2", ["seed=1", "trainer.max_epochs=16"], 0.2),
                line(sweep / "3", ["seed=2", "trainer.max_epochs=16"], 0.4)],
        single: [line(single / "d1", ["debug=fast_dev_run"], 0.01, {"debug": "fast_dev_run"}),
                 line(single / "d2", ["debug=limit"], 0.02),  # outside Hydra: known by its task name
                 *[line(single / f"e{i}", ["train=false", "ckpt_path=best.ckpt", "seed=1"], 0.5 + i / 1000,
                        checkpoint_config=trained[1], weights="same-weights") for i in range(3)],
                 line(single / "e3", ["train=false", "ckpt_path=other.ckpt", "seed=2"], 0.7,
                      checkpoint_config=trained[2], weights="other-weights")],
    }
    for folder, written in lines.items():
        for r in written:
            results_table.append_result(folder / results_table.RESULTS_NAME, r)
    kinds = [r["kind"] for r in lines[single]]
    assert kinds == ["debug", "debug", "evaluation", "evaluation", "evaluation", "evaluation"]
    default_recipe = lines[sweep][0]["recipe"]
    assert lines[sweep][1]["recipe"] == default_recipe != lines[sweep][2]["recipe"] == lines[sweep][3]["recipe"]
    # evaluating a run's checkpoint as the run tested it gives that run's recipe
    assert {r["recipe"] for r in lines[single][2:]} == {default_recipe}

    entries, text = results_table.load_table([tmp_path])
    runs = {(e["kind"], e["recipe_settings"]["trainer.max_epochs"]): e for e in entries}
    assert {k: (e["runs"], e["seeds"]) for k, e in runs.items()} == {
        ("training", default): (2, [1, 2]), ("training", 16): (2, [1, 2]), ("evaluation", default): (2, [1, 2])}
    assert runs[("training", default)]["acc50/test"] == pytest.approx(0.6)
    assert runs[("evaluation", default)]["acc50/test"] == pytest.approx(0.601)  # the last evaluation of a checkpoint
    assert "6 runs in 3 groups; left out: 2 debug runs (--include debug shows them), " \
           "2 evaluations of weights already counted" in text
    assert "read 2 results files" in text and "(4 lines)" in text and "(6 lines)" in text
    assert results_table.recipe_differences(entries) == ["trainer.max_epochs"]
    table = results_table.format_table(entries)
    assert table.splitlines()[0].startswith("| benchmark | kind | recipe | method | rank | mode | trainer.max_epochs |")
    assert f"| synthetic | training | {default_recipe} | mapper | 32 | clean | {default} | 2 |" in table

    assert results.main([str(tmp_path), "--include", "debug"]) == 0
    captured = capsys.readouterr()
    summary = captured.out.split("\n\n")[0]  # the results table; its statistics follow
    debug_rows = [r for r in summary.splitlines() if "| debug |" in r]
    assert len(debug_rows) == 2 and all(" | 1 | " in r for r in debug_rows)  # two recipes, one run each
    assert "8 runs in 5 groups; left out: 2 evaluations of weights already counted" in captured.err
    assert "trainer.fast_dev_run" in captured.out.splitlines()[0]


def test_a_results_line_from_before_kinds_and_recipes_still_loads(tmp_path: Path):
    """Old lines: with their run's results.json the recipe is derived from its config, else it is unknown
    (and such lines are grouped by experiment, method and settings, as before)."""
    old = json.loads(OLD_STUDY.read_text().splitlines()[0])
    assert "kind" not in old and "recipe" not in old
    run_dir = tmp_path / "sweep" / "0"
    run_dir.mkdir(parents=True)
    config = resolved(compose(["peft=lora", "seed=4"]))
    (run_dir / "results.json").write_text(json.dumps({"wall_seconds": 12.5, "config": config}))
    moved = {**old, "output_dir": "/elsewhere/sweep/0", "wall_seconds": 12.5, "experiment": "train"}
    results_table.append_result(tmp_path / "sweep" / results_table.RESULTS_NAME, moved)
    results_table.append_result(tmp_path / results_table.RESULTS_NAME, old)
    found = {r["experiment"]: r for r in results_table.load_results([tmp_path])}
    assert found["petl_synthetic"] | {"kind": "training", "recipe": None, "derived_from": "guess"} == \
        found["petl_synthetic"]
    derived = found["train"]
    assert derived["derived_from"] == "results.json" and derived["kind"] == "training"
    assert derived["recipe"] == line(run_dir, ["peft=lora", "seed=4"], 0.5)["recipe"]
    entries, text = results_table.load_table([OLD_STUDY])
    assert len(entries) == 12 and {e["runs"] for e in entries} == {3} and {e["recipe"] for e in entries} == {"unknown"}
    assert "36 runs of unknown recipe" in text


def test_kinds_of_runs_and_where_the_notebook_reads():
    for name in ("fast_dev_run", "limit", "overfit", "profiler"):
        assert results_table.run_kind(resolved(compose([f"debug={name}"])), {}) == "debug"
    assert results_table.run_kind(resolved(compose([])), {}) == "training"
    assert results_table.run_kind(resolved(compose(["train=false", "ckpt_path=x.ckpt"])), {}) == "evaluation"
    recipe = results_table.run_recipe(resolved(compose([])))
    assert "seed" not in recipe and "trainer.max_epochs" in recipe and "peft.rank" in recipe
    assert not any(k.startswith(("paths.", "logger.")) or k == "data.num_workers" for k in recipe)
    assert results_table.run_recipe(resolved(compose(["train=false", "ckpt_path=x.ckpt"]))) is None  # no stored config
    cached = {"model": {"vision": {"init_checkpoint": "/machine/a/.cache/vit-synthetic-0123.pt"}}}
    assert results_table.run_recipe(cached) == {"model.vision.init_checkpoint": "vit-synthetic-0123.pt"}
    assert results_table.resolve_sources(None) == [PROJECT_ROOT / "experiments" / "petl_comparison"]
    assert results_table.resolve_sources("multirun /abs/x") == [PROJECT_ROOT / "multirun", Path("/abs/x")]
    with pytest.raises(results_table.NoRunsFound, match="found 0 runs to show"):
        results_table.load_table([PROJECT_ROOT / "no-such-folder"])
    with pytest.raises(ConfigError, match="unknown kind of run"):
        results_table.load_table([PROJECT_ROOT / "experiments"], ["training", "debugg"])


def test_an_evaluation_is_labelled_with_its_checkpoints_method(tmp_path: Path):
    checkpoint = tmp_path / "lora.ckpt"
    torch.save({"state_dict": {}, "choices": {"model": "mapper_tiny", "peft": "lora", "data": "synthetic"}},
               checkpoint)
    assert run_choices(compose(["train=false", f"ckpt_path={checkpoint}"])) == {"model": "mapper_tiny",
                                                                                  "peft": "lora"}
    assert run_choices(compose([f"ckpt_path={checkpoint}"])) == {}  # training (resuming): the run's own choices


def execute_notebook(folder: Path, **env: str):
    """Run the comparison notebook, copied into `folder` (its kernel starts there), with `env` set."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(PROJECT_ROOT / "notebooks" / "compare_petl.ipynb", as_version=4)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(folder)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.slow
def test_the_notebook_reads_the_committed_study_from_anywhere_and_says_when_it_finds_nothing(tmp_path: Path):
    """Run from a copy outside the repository (the suite importable as when installed): the default source is
    the committed study, found from the suite's own location; an empty source fails loudly."""
    installed = {"PYTHONPATH": str(PROJECT_ROOT), "PETL_RESULTS": "", "PETL_FIGURE": str(tmp_path / "fig.png")}
    outputs = execute_notebook(tmp_path / "elsewhere", **installed)
    printed = "".join(o.get("text", "") for o in outputs)
    committed = [json.loads(line) for line in STUDY.read_text().splitlines()]
    groups = {(r["recipe"], r["method"]) for r in committed}
    assert f"{STUDY.name} ({len(committed)} lines)" in printed
    assert f"{len(committed)} runs in {len(groups)} groups" in printed
    markdown = "".join(o.data.get("text/markdown", "") for o in outputs if "data" in o)
    # clean MaPPER at the study's default rank, no official quirk set (the study also runs one alone)
    mapper = [r for r in committed if r["method"] == "mapper" and r["rank"] == 32 and r["mode"] == "clean"
              and not any(v for k, v in r["recipe_settings"].items() if k.startswith("model.quirks."))]
    row = next(line for line in markdown.splitlines()
               if line.startswith(f"| synthetic_shift | training | {mapper[0]['recipe']} | mapper | 32 | clean |"))
    assert f"| {len(mapper)} |" in row and {r["recipe"] for r in mapper} == {mapper[0]["recipe"]}
    assert "Δ vs frozen" in markdown and "| bootstrap |" in markdown  # the committed lines record every sample
    assert (tmp_path / "fig.png").stat().st_size > 10_000

    nbclient = pytest.importorskip("nbclient")
    (tmp_path / "empty").mkdir()
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="found 0 runs to show"):
        execute_notebook(tmp_path / "elsewhere", **{**installed, "PETL_RESULTS": str(tmp_path / "empty")})


@pytest.mark.slow
def test_method_rank_seed_sweep_feeds_the_table_and_the_notebook(tmp_path: Path, capsys):
    sweep(tmp_path, "peft=lora,adapter", "peft.rank=4,8", "seed=1,2")
    lines = (tmp_path / "sweep" / results_table.RESULTS_NAME).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert sorted((r["method"], r["rank"], r["seed"]) for r in rows) == sorted(
        (m, k, s) for m in ("lora", "adapter") for k in (4, 8) for s in (1, 2))
    for r in rows:
        assert r["status"] == "ok" and r["benchmark"] == "synthetic" and r["git_commit"]
        assert r["kind"] == "training" and r["recipe"] == results_table.recipe_id(r["recipe_settings"])
        assert r["checkpoint_bytes"] > 0 and r["best_epoch"] == 0 and r["peak_memory_bytes"] > 0
        assert 0 <= r["splits"]["test"]["acc50"] <= 1 and "test" in r["shuffled_text"]
        assert r["tunable_backbone"] > 0 and r["trainable"] > r["tunable_backbone"]
    assert results.main([str(tmp_path / "sweep")]) == 0
    table = capsys.readouterr().out
    assert sum(line.startswith("| synthetic | training |") for line in table.splitlines()) == 4
    assert len({r["recipe"] for r in rows}) == 4  # method x rank; the seed is not part of a recipe
    assert "peft.rank" not in table.splitlines()[0]  # the rank column shows it
    # every run recorded its test samples: the statistics' intervals come from the bootstrap (2 seeds each)
    assert sum(line.endswith("| bootstrap |") and line.startswith("| synthetic | test | training |")
               for line in table.splitlines()) == 4

    figure = tmp_path / "figure.png"
    outputs = execute_notebook(PROJECT_ROOT / "notebooks", PETL_RESULTS=str(tmp_path / "sweep"),
                               PETL_FIGURE=str(figure))
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = "".join(o.data.get("text/markdown", "") for o in outputs if "data" in o)
    assert re.search(r"\| synthetic \| training \| \w{10} \| lora \| 4 \| clean \| 2 \|", markdown)
    assert re.search(r"\| synthetic \| training \| \w{10} \| adapter \| 8 \| clean \| 2 \|", markdown)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert figure.stat().st_size > 10_000
    assert "8 runs in 4 groups; left out: none" in "".join(o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_optuna_search_over_rank_and_learning_rate(tmp_path: Path):
    sweep(tmp_path, "hparams_search=optuna", "peft=lora", "hydra.sweeper.n_trials=2")
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"peft.rank", "optim.optimizer.lr"}
    rows = results_table.load_results([tmp_path / "sweep"])
    assert len(rows) == 2 and all(r["method"] == "lora" and r["rank"] in (4, 8, 16, 32, 64) for r in rows)


def test_hparams_search_and_debug_configs_compose():
    cfg = compose(["hparams_search=optuna", "peft=adapter"])
    assert cfg.task_name == "optuna" and cfg.peft.rank == 32
    for name in sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml")):
        cfg = compose([f"debug={name}"])
        assert cfg.task_name.startswith("debug")
        # every debug config starts from debug/default: no W&B run, no sample cache filled for a few batches
        assert cfg.logger.wandb is None and cfg.data.cache_samples is False
    assert compose(["debug=fast_dev_run"]).trainer.fast_dev_run is True
    assert compose(["debug=overfit"]).trainer.overfit_batches == 4
    assert compose(["debug=limit"]).shuffled_text_check is True  # the whole pipeline, the control included


def test_the_optimised_metric_is_a_setting():
    """The checkpoint's best score when it monitors the metric; else the metric as last logged; a metric its loop
    never logged is a mistake named in one line; one whose loop did not run gives None (an evaluation's val/)."""
    trainer = SimpleNamespace(checkpoint_callback=ModelCheckpoint(monitor="val/acc50"))
    logged = {"val/acc50": 0.25, "val/miou": 0.4, "test/test/acc50": 0.3}

    def value(name: str, logged: dict = logged) -> float | None:
        return optimized_value(compose([f"optimized_metric={name}"]), trainer, 0.5, logged)

    assert value("val/acc50") == 0.5  # the best epoch's, not the last epoch's 0.25
    assert value("val/miou") == 0.4 and value("test/test/acc50") == 0.3
    assert value("val/acc50", {"test/test/acc50": 0.3}) == 0.5
    trainer.checkpoint_callback = None
    assert value("val/acc50", {"test/test/acc50": 0.3}) is None
    with pytest.raises(ConfigError, match=r"optimized_metric=val/acc5 was not logged by this run; it logged test/"):
        value("val/acc5")


def test_fast_dev_run_debug_mode_runs_end_to_end(tmp_path: Path):
    cfg = compose([f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", *TINY_JOB,
                   "debug=fast_dev_run", "logger=csv", "optimized_metric=val/miou"])
    returned = run(cfg)  # fast_dev_run saves no checkpoint: the value is the one validation's val/miou
    assert isinstance(returned, float) and 0.0 < returned < 1.0
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["splits"]["test"]["n"] > 0
    written_line = json.loads((tmp_path / "run" / results_table.RESULTS_NAME).read_text())
    assert written_line["kind"] == "debug" and written_line["recipe_settings"]["trainer.fast_dev_run"] is True
    # the per-sample record: every test sample's outcome in the line, its IoU in the run folder, both agreeing
    # with the split's figures (fast_dev_run tests one batch: 8 of the split's 12 samples)
    evaluated, hits = read_hits(written_line["sample_hits"]["test"])
    n = written["splits"]["test"]["n"]
    assert (len(evaluated), evaluated.sum(), n) == (12, 8, 8) and "evaluated" in written_line["sample_hits"]["test"]
    assert hits.sum() / n == pytest.approx(written["splits"]["test"]["acc50"])
    stored = read_samples(tmp_path / "run" / SAMPLES_FILE)["test"]
    assert stored.size == len(evaluated) and list(stored.index) == list(np.flatnonzero(evaluated))
    assert stored.iou.mean() == pytest.approx(written["splits"]["test"]["miou"], abs=1e-6)
    assert list(stored.iou >= 0.5) == list(hits[evaluated])


@pytest.mark.slow
def test_a_diverging_job_is_recorded_as_failed_and_the_sweep_goes_on(tmp_path: Path):
    sweep(tmp_path, "optim.optimizer.lr=1e38,1e-3")  # LR 1e38 makes the weights, then the loss, non-finite
    rows = [json.loads(line) for line in (tmp_path / "sweep" / results_table.RESULTS_NAME).read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[0]["reason"].startswith("non-finite loss at global step")
    assert json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())["status"] == "failed"
    assert [e["runs"] for e in results_table.summarise(rows)] == [1]  # failed runs are not averaged in


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
    rows = [json.loads(line) for line in (tmp_path / "sweep" / results_table.RESULTS_NAME).read_text().splitlines()]
    assert [(r["seed"], r["processes"], r["status"]) for r in rows] == [(1, 2, "ok"), (2, 2, "ok")]
    for job in folders:  # each job's second process wrote its own log in the job's folder
        assert (tmp_path / "sweep" / job / "train_ddp_process_1.log").exists(), proc.stderr[-2000:]
        assert json.loads((tmp_path / "sweep" / job / "results.json").read_text())["status"] == "ok"
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "sweep")], capture_output=True, text=True)
    assert not leftover.stdout.strip(), "a process of the sweep is still alive"
