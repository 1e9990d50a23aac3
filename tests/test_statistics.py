"""Statistics of the results table (`src.analysis.statistics`) and its figures (`src.analysis.figures`), on
synthetic results lines whose per-sample outcomes are drawn with known accuracies: true differences of 0.15
must come out resolved, true differences of 0 not, the same every time."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src import results
from src.analysis import figures, statistics
from src.analysis import table as results_table
from src.analysis.samples import SplitSamples, hit_record, read_hits
from src.analysis.statistics import Estimate, Statistics, resampled_means, t_estimate, t_quantile
from tests.conftest import PROJECT_ROOT

SAMPLES = 600
SEEDS = (1, 2, 3, 4, 5)
# Each sample's difficulty, shared by every method and seed (the same test set).
DIFFICULTY = np.random.default_rng(0).uniform(-0.25, 0.25, SAMPLES)


def outcomes(skill: float, seed: int, method: str) -> np.ndarray:
    """One run's per-sample Acc@0.5 outcomes: sample i right with probability skill + difficulty_i, plus a small
    seed-to-seed shift of the run's skill."""
    rng = np.random.default_rng([seed, sum(map(ord, method))])
    return rng.uniform(size=SAMPLES) < skill + rng.normal(0, 0.01) + DIFFICULTY


def line(method: str, seed: int, acc: float, rank: int | None = None, hits: np.ndarray | None = None,
         params: int = 100, epochs: int = 14) -> dict:
    """A results line of a training run (its recipe: the method's settings on a shared base)."""
    settings = {"data.dataset": "synthetic", "trainer.max_epochs": epochs, "peft._target_": method}
    if rank is not None:
        settings["peft.rank"] = rank
    return {
        "experiment": "study", "kind": "training", "recipe": results_table.recipe_id(settings),
        "recipe_settings": settings,
        "benchmark": "synthetic", "method": method, "rank": rank, "peft": {"rank": rank}, "mode": "clean",
        "seed": seed, "tunable_backbone": params, "tunable_backbone_pct": 1.0,
        "splits": {"test": {"acc50": acc, "miou": acc / 2, "n": SAMPLES}}, "shuffled_text": {},
        "sample_hits": {} if hits is None else {"test": hit_record(SplitSamples(SAMPLES, np.arange(SAMPLES),
                                                                                hits.astype(np.float32)))},
        "output_dir": f"{method}-{rank}-{seed}-{epochs}", "wall_seconds": 1.0, "status": "ok",
    }


def recorded(method: str, skill: float, seeds=SEEDS, **extra) -> list[dict]:
    """Lines of a method whose runs recorded their per-sample outcomes."""
    lines = []
    for seed in seeds:
        hits = outcomes(skill, seed, method)
        lines.append(line(method, seed, float(hits.mean()), hits=hits, **extra))
    return lines


def write(folder: Path, lines: list[dict]) -> None:
    for row in lines:
        results_table.append_result(folder / results_table.RESULTS_NAME, row)


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """Two sweep folders: frozen, mapper (+0.15) and lora (+0) with per-sample records; ia3 (+0.1 every seed) and
    dora (+0, noisy) as lines from before the record (per-run Acc@0.5 only)."""
    frozen = recorded("frozen", 0.45)
    write(tmp_path / "new", frozen + recorded("mapper", 0.60, rank=32) + recorded("lora", 0.45, rank=8))
    base = {r["seed"]: r["splits"]["test"]["acc50"] for r in frozen}
    shift = dict(zip(SEEDS, (0.02, -0.03, 0.01, 0.03, -0.02), strict=True))
    write(tmp_path / "old", [line("ia3", s, base[s] + 0.1 + shift[s] / 5) for s in SEEDS]
          + [line("dora", s, base[s] + shift[s], rank=8) for s in SEEDS])
    return tmp_path


def table(folder: Path, *against: str) -> dict[str, statistics.Row]:
    runs, entries, _ = results_table.load_runs([folder])
    _, rows = Statistics(entries, runs).table(against or statistics.DEFAULT_AGAINST)
    return {r.entry["method"]: r for r in rows}


def test_t_quantiles_and_intervals():
    assert t_quantile(2) == 4.3027 and t_quantile(29) == 2.0452
    assert t_quantile(30) == pytest.approx(2.0423, abs=1e-4) and t_quantile(1000) == pytest.approx(1.9623, abs=1e-4)
    est = t_estimate([0.1, 0.2, 0.3])  # sd 0.1 over 3: half width 4.3027 * 0.1 / sqrt(3)
    assert (est.value, est.low, est.high) == pytest.approx((0.2, 0.2 - 0.24841, 0.2 + 0.24841), abs=1e-5)
    assert est.method == "t" and not est.resolved and Estimate(0.1, 0.01, 0.2, "t", 3).resolved
    assert t_estimate([0.4]).low is None  # one seed: no interval


def test_hits_travel_in_the_line_as_bits():
    iou = np.array([0.9, 0.2, 0.5, 0.49999, 0.7], dtype=np.float32)
    record = hit_record(SplitSamples(7, np.array([0, 1, 2, 3, 6]), iou))  # samples 4 and 5 were skipped
    evaluated, hits = read_hits(record)
    assert evaluated.tolist() == [True, True, True, True, False, False, True]
    assert hits.tolist() == [True, False, True, False, False, False, True]
    full = hit_record(SplitSamples(1000, np.arange(1000), np.ones(1000, dtype=np.float32)))
    assert "evaluated" not in full and len(full["hits"]) == 168


def test_the_bootstrap_scores_every_row_on_the_same_drawn_samples():
    rng = np.random.default_rng(1)
    rows = rng.uniform(size=(3, 500)) < 0.5
    rows[2] = rows[0]
    draws = resampled_means(rows, 300, np.random.default_rng(7))
    assert draws.shape == (300, 3)
    assert np.array_equal(draws, resampled_means(rows, 300, np.random.default_rng(7)))  # deterministic
    assert np.array_equal(draws[:, 0], draws[:, 2])  # one sample draw for every row: identical rows stay identical
    assert draws.mean(axis=0) == pytest.approx(rows.mean(axis=1), abs=0.01)
    # the spread of a resampled accuracy is the binomial one, sqrt(p (1 - p) / n)
    assert draws[:, 1].std() == pytest.approx(np.sqrt(0.25 / 500), rel=0.15)


def test_resolved_and_unresolved_differences_in_mixed_folders(mixed: Path):
    rows = table(mixed)
    mapper, lora, frozen = rows["mapper"], rows["lora"], rows["frozen"]
    assert mapper.mean.method == "bootstrap" and mapper.mean.seeds == 5
    assert mapper.mean.low < mapper.mean.value < mapper.mean.high
    true_gain = mapper.differences["frozen"]
    assert true_gain.method == "bootstrap" and true_gain.resolved and true_gain.value == pytest.approx(0.15, abs=0.03)
    assert lora.differences["frozen"].method == "bootstrap" and not lora.differences["frozen"].resolved
    assert lora.differences["frozen"].low < 0 < lora.differences["frozen"].high
    assert lora.differences["mapper"].resolved and lora.differences["mapper"].value < 0
    assert frozen.differences["frozen"] == "reference" and mapper.differences["mapper"] == "reference"
    # lines without per-sample outcomes: the t interval over paired seed differences
    assert rows["ia3"].mean.method == "t" and rows["ia3"].differences["frozen"].method == "t"
    assert rows["ia3"].differences["frozen"].resolved
    assert rows["ia3"].differences["frozen"].value == pytest.approx(0.1 + 0.01 / 25, abs=1e-6)  # the shifts sum to 0.01
    assert not rows["dora"].differences["frozen"].resolved and rows["dora"].differences["frozen"].method == "t"
    # a paired difference equals the difference of the means (every seed paired)
    assert true_gain.value == pytest.approx(mapper.mean.value - frozen.mean.value, abs=1e-9)


def test_a_recipe_is_compared_only_with_references_of_its_own_recipe(tmp_path: Path):
    write(tmp_path, recorded("frozen", 0.45, seeds=(1, 2)) + recorded("lora", 0.5, seeds=(1, 2, 3), rank=8)
          + recorded("lora", 0.5, seeds=(1, 2), rank=8, epochs=16)
          + [r for rank in (8, 32) for r in recorded("mapper", 0.6, seeds=(1, 2), rank=rank)])
    runs, entries, _ = results_table.load_runs([tmp_path])
    _, rows = Statistics(entries, runs).table(["frozen", "mapper"])
    lora = {r.entry["recipe_settings"]["trainer.max_epochs"]: r for r in rows if r.entry["method"] == "lora"}
    assert lora[16].differences == {"frozen": "-", "mapper": "-"}  # no reference trained 16 epochs
    assert lora[14].differences["frozen"].seeds == 2  # paired on the seeds both have
    assert "(2 of 3 seeds paired)" in statistics.estimate_cell(lora[14].differences["frozen"], True, 3)
    # among mapper's ranks, one reference for every row: the rank conf/peft/mapper.yaml ships (32), mapper's other
    # ranks included; a recipe fingerprint names any group
    mapper = {e["rank"]: e for e in entries if e["method"] == "mapper"}
    frozen = next(e for e in entries if e["method"] == "frozen")
    for entry in (lora[14].entry, frozen, mapper[8]):
        assert statistics.reference_for(entry, entries, "mapper") is mapper[32]
    assert statistics.reference_for(mapper[32], entries, "mapper") == "reference"
    assert statistics.reference_for(lora[14].entry, entries, mapper[8]["recipe"]) is mapper[8]
    assert statistics.reference_for(mapper[8], entries, mapper[8]["recipe"]) == "reference"


def test_without_the_shipped_rank_the_reference_is_the_same_rank_else_none(tmp_path: Path):
    write(tmp_path, recorded("frozen", 0.45, seeds=(1, 2)) + recorded("lora", 0.5, seeds=(1, 2), rank=8)
          + [r for rank in (8, 16) for r in recorded("mapper", 0.6, seeds=(1, 2), rank=rank)])
    _, entries, _ = results_table.load_runs([tmp_path])
    by_method = {(e["method"], e["rank"]): e for e in entries}
    assert statistics.reference_for(by_method["lora", 8], entries, "mapper") is by_method["mapper", 8]
    assert statistics.reference_for(by_method["mapper", 16], entries, "mapper") == "reference"
    assert "2 mapper groups match" in statistics.reference_for(by_method["frozen", None], entries, "mapper")


def test_the_cli_prints_the_statistics_the_same_every_time(mixed: Path, capsys):
    assert results.main([str(mixed)]) == 0
    first = capsys.readouterr().out
    assert results.main([str(mixed)]) == 0
    assert capsys.readouterr().out == first
    assert "hierarchical bootstrap" in first and "Student t" in first
    stats_table = first[first.index("| benchmark | split |"):]
    assert "| Δ vs frozen [95% interval] | Δ vs mapper [95% interval] | interval |" in stats_table
    mapper_row = next(r for r in stats_table.splitlines() if "| mapper |" in r)
    lora_row = next(r for r in stats_table.splitlines() if "| lora |" in r)
    assert mapper_row.split("|")[9].strip().endswith("resolved") and "| bootstrap |" in mapper_row
    assert "resolved" not in lora_row.split("|")[9]
    assert "| t |" in next(r for r in stats_table.splitlines() if "| ia3 |" in r)

    assert results.main([str(mixed), "--stats", "--format", "csv", "--against", "lora"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(parsed) == 5 and "vs_mapper" not in parsed[0]
    by_method = {r["method"]: r for r in parsed}
    assert by_method["mapper"]["vs_lora_resolved"] == "True" and by_method["mapper"]["vs_lora_method"] == "bootstrap"
    assert by_method["lora"]["vs_lora_method"] == "reference"
    with pytest.raises(SystemExit):
        results.main([str(mixed), "--against", "frozen,nosuch"])
    assert "no group of method or recipe nosuch" in capsys.readouterr().err


def rank_study(folder: Path) -> None:
    """LoRA, Adapter, AdaptFormer and MaPPER at ranks 4, 8, 16 (parameters growing with the rank), 3 seeds, and
    frozen; only MaPPER recorded per-sample outcomes."""
    lines = recorded("frozen", 0.45, seeds=(1, 2, 3))
    for method, per_rank in (("lora", 900), ("adapter", 1000), ("adaptformer", 1000)):
        lines += [line(method, s, 0.46 + rank / 400 + s / 1000, rank=rank, params=per_rank * rank)
                  for rank in (4, 8, 16) for s in (1, 2, 3)]
    for rank in (4, 8, 16):
        lines += recorded("mapper", 0.5 + rank / 200, seeds=(1, 2, 3), rank=rank, params=4000 * rank)
    write(folder, lines)


def test_the_rank_figure_from_results_lines(tmp_path: Path):
    rank_study(tmp_path)
    runs, entries, _ = results_table.load_runs([tmp_path])
    stats = Statistics(entries, runs)
    points = figures.rank_points(stats, "synthetic", "test")
    assert [(p.series, p.rank, p.params) for p in points if p.series == "lora"] == [
        ("lora", 4, 3600), ("lora", 8, 7200), ("lora", 16, 14400)]
    assert {p.series for p in points} == set(figures.RANK_METHODS) and len(points) == 12
    assert {p.acc.method for p in points if p.method == "mapper"} == {"bootstrap"}
    assert {p.acc.method for p in points if p.method != "mapper"} == {"t"}
    assert all(p.acc.low < p.acc.value < p.acc.high for p in points)

    out = tmp_path / "rank.png"
    proc = subprocess.run([sys.executable, "-m", "src.results", str(tmp_path), "--rank-figure", str(out), "--stats",
                           "--against", "frozen"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_size > 10_000 and f"rank figure written to {out}" in proc.stderr
    assert sum(row.startswith("| synthetic | test |") for row in proc.stdout.splitlines()) == 13


def test_the_comparison_figure_draws_means_and_differences(mixed: Path, tmp_path: Path):
    runs, entries, _ = results_table.load_runs([mixed])
    names, rows = Statistics(entries, runs).table()
    fig = figures.comparison_figure(names, rows)
    assert len(fig.axes) == 3
    fig.savefig(tmp_path / "comparison.png")
    assert (tmp_path / "comparison.png").stat().st_size > 10_000


def in_mode(lines: list[dict], mode: str) -> list[dict]:
    """The lines as runs of `model.mode=<mode>` (the setting in their recipe, which their fingerprint follows)."""
    for row in lines:
        row["recipe_settings"]["model.mode"] = row["mode"] = mode
        row["recipe"] = results_table.recipe_id(row["recipe_settings"])
        row["output_dir"] += f"-{mode}"  # another run (the table keeps one line per run folder)
    return lines


def test_official_and_clean_mode_are_told_apart_in_the_statistics_and_figures(tmp_path: Path):
    """Official-mode runs beside clean ones (what the official quirks cost): the statistics table names the mode
    where it differs and the figures' labels an official one (the main table has a mode column of its own); a clean
    group's recipe fingerprint makes it their reference."""
    quirk = in_mode(recorded("mapper", 0.50, rank=32), "clean")
    for row in quirk:  # one official quirk alone in clean mode
        row["recipe_settings"]["model.quirks.additive_fusion_mask"] = True
        row["recipe"], row["output_dir"] = results_table.recipe_id(row["recipe_settings"]), row["output_dir"] + "-quirk"
    write(tmp_path, in_mode(recorded("frozen", 0.45) + recorded("mapper", 0.60, rank=32), "clean")
          + in_mode(recorded("mapper", 0.45, rank=32), "official") + quirk)
    runs, entries, _ = results_table.load_runs([tmp_path])
    stats = Statistics(entries, runs)
    clean = next(e for e in entries if e["method"] == "mapper" and e["mode"] == "clean"
                 and "model.quirks.additive_fusion_mask" not in e["recipe_settings"])
    names, rows = stats.table(["frozen", "mapper", clean["recipe"]])
    official = next(r for r in rows if r.entry["mode"] == "official")
    assert official.differences["frozen"] == "-" and official.differences["mapper"] == "reference"
    cost = official.differences[clean["recipe"]]
    assert cost.resolved and cost.value == pytest.approx(-0.15, abs=0.03)

    markdown = statistics.format_statistics(names, rows)
    assert ("| benchmark | split | kind | recipe | method | rank | model.mode | model.quirks.additive_fusion_mask "
            "| seeds |") in markdown
    assert sum("| mapper | 32 | official |" in r for r in markdown.splitlines()) == 1
    # labels name the mode when official, and a setting only where it differs within the method and mode
    assert {p.series for p in figures.rank_points(stats, "synthetic", "test")} == {
        "mapper [official]", "mapper, additive_fusion_mask=-", "mapper, additive_fusion_mask=True"}
    frozen = next(e for e in entries if e["method"] == "frozen")
    assert figures.label_settings(entries)[id(frozen)] == []
    assert "| mapper | 32 | clean |" in results_table.format_table(entries)  # the main table's own mode column


def test_the_shipped_rank_is_the_method_configs_own_or_inherited():
    from src.config import shipped_rank

    assert [shipped_rank(n) for n in ("mapper", "mapper_no_pgt", "lora", "dora", "ia3", "frozen")] == [
        32, 32, 8, 8, None, None]
    assert shipped_rank("my_plugin_method") is None and shipped_rank("../peft/mapper") is None
