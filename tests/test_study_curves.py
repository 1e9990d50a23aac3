"""The PETL study's curve gatherer (experiments/petl_comparison/curves.py) on hand-made run folders."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "experiments" / "petl_comparison" / "curves.py"


def load_script():
    spec = importlib.util.spec_from_file_location("curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_run(folder: Path, method: str, rank: int | None, seed: int, val: list[float], mode: str = "clean",
             quirks: str = "") -> None:
    """A run folder as `python -m src.run` leaves it: Hydra's config and the CSV log, with a learning-rate line
    and a training line per epoch beside the validation line (only the latter carries val/acc50)."""
    (folder / ".hydra").mkdir(parents=True)
    rank_line = "null" if rank is None else rank
    (folder / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\npeft:\n  name: {method}\n  rank: {rank_line}\nmodel:\n  mode: {mode}\n  quirks: {{{quirks}}}\n")
    (folder / "csv").mkdir()
    with (folder / "csv" / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "lr-AdamW/head", "step", "train/loss", "val/acc50"])
        for epoch, acc in enumerate(val):
            writer.writerow(["", 1e-4, epoch * 10, "", ""])
            writer.writerow([epoch, "", epoch * 10 + 9, 3.0, ""])
            writer.writerow([epoch, "", epoch * 10 + 9, "", acc])


def test_curves_are_gathered_per_run_and_the_late_rise_measures_flatness(tmp_path: Path, capsys):
    curves = load_script()
    flat = [0.01 * e for e in range(20)] + [0.3] * 20  # flat from epoch 20: no late rise, best epoch 20
    rising = [0.01 * e for e in range(40)]  # still climbing: last five (0.37 mean) minus epochs 25-29 (0.27)
    make_run(tmp_path / "a" / "0", "lora", 8, 1, flat)
    make_run(tmp_path / "a" / "1", "lora", 8, 2, rising)
    make_run(tmp_path / "b", "frozen", None, 1, flat)
    out = tmp_path / "curves.csv"
    assert curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "--csv", str(out)]) == 0
    lines = list(csv.DictReader(out.open()))
    assert len(lines) == 3 * 40 and lines[0].keys() == set(curves.FIELDS)
    assert {(r["method"], r["rank"], r["mode"], r["seed"]) for r in lines} == {
        ("lora", "8", "clean", "1"), ("lora", "8", "clean", "2"), ("frozen", "", "clean", "1")}
    table = capsys.readouterr().out
    assert "| lora | 8 | clean | - | 2 | 40 | 29.5 (20-39) | +0.050, +0.100 |" in table
    assert "| frozen | - | clean | - | 1 | 40 | 20.0 (20-20) | +0.000, +0.000 |" in table


def test_curves_of_an_earlier_csv_join_new_runs_and_modes_stay_apart(tmp_path: Path, capsys):
    """`--from` reads a CSV written before (one without a mode column: clean mode); an official-mode run of the
    same method, rank and seed is a group of its own, and so is a clean run with an official quirk set; a run
    given twice is refused in one line."""
    curves = load_script()
    earlier = tmp_path / "earlier.csv"
    rising = "".join(f"mapper,32,1,{e},{0.01 * e}\n" for e in range(40))
    earlier.write_text("method,rank,seed,epoch,val_acc50\n" + rising)
    make_run(tmp_path / "runs" / "official", "mapper", 32, 1, [0.3] * 40, mode="official")
    make_run(tmp_path / "runs" / "quirk", "mapper", 32, 1, [0.2] * 40,
             quirks="loca_official_init: null, additive_fusion_mask: true")
    merged = tmp_path / "merged.csv"
    assert curves.main([str(tmp_path / "runs"), "--from", str(earlier), "--csv", str(merged)]) == 0
    table = capsys.readouterr().out
    assert "| mapper | 32 | clean | - | 1 | 40 | 39.0 (39-39) | +0.100, +0.100 |" in table
    assert "| mapper | 32 | official | - | 1 | 40 | 0.0 (0-0) | +0.000, +0.000 |" in table
    assert "| mapper | 32 | clean | additive_fusion_mask=true | 1 | 40 |" in table
    assert curves.main(["--from", str(merged)]) == 0
    assert capsys.readouterr().out == table  # the merged CSV alone gives the same table

    assert curves.main([str(tmp_path / "runs" / "official"), "--from", str(merged)]) == 1
    assert capsys.readouterr().err.startswith("mapper rank 32 mode official seed 1 comes twice")


def test_no_run_found_is_one_line(tmp_path: Path, capsys):
    assert load_script().main([str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("no run folder with .hydra/config.yaml")
