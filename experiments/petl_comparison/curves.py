"""Validation curves of a study's runs, gathered into one CSV, and how flat each method's curve ends.

    python experiments/petl_comparison/curves.py [RUN_FOLDER...] [--from CSV...] [--csv OUT]

Every run folder (`hydra.run.dir`, or a sweep's numbered folders; searched recursively) holds its Hydra
config (`.hydra/config.yaml`: method, rank, mode, quirks set, seed) and its CSV log (`csv/metrics.csv`: val
Acc@0.5 per epoch); `--from` adds the curves of a CSV this script wrote before (the committed
`val_curves.csv`, whose run folders are gone; lines without a mode are clean mode's). The CSV gets one line
per run and epoch; the printed table, per method, rank, mode and quirks set, the best epoch and the rise of
val Acc@0.5 over the last ten epochs (mean of the last five minus mean of the five before the last ten): near
zero where a curve is flat, so "trained to convergence" is a measured statement.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from omegaconf import OmegaConf

FIELDS = ("method", "rank", "mode", "quirks", "seed", "epoch", "val_acc50")


def run_curve(folder: Path) -> list[dict]:
    """One run's val Acc@0.5 per epoch, with the run's method, rank (empty for methods without one), mode, the
    official quirks it set against its mode (`model.quirks.<name>`, e.g. `unit_normal_fusion_positions=true`)
    and seed."""
    cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
    method, rank, seed = cfg.peft.name, cfg.peft.get("rank"), cfg.seed
    model = cfg.get("model", {})
    mode = model.get("mode", "clean")
    quirks = " ".join(f"{name}={str(value).lower()}" for name, value in sorted((model.get("quirks") or {}).items())
                      if value is not None)
    with (folder / "csv" / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc50")]
    return [dict(method=method, rank="" if rank is None else rank, mode=mode, quirks=quirks, seed=seed,
                 epoch=int(r["epoch"]), val_acc50=round(float(r["val/acc50"]), 4)) for r in rows]


def read_curves(path: Path) -> list[dict]:
    """The lines of a CSV written by `--csv` (numbers as numbers; no mode column: clean mode, no quirk set)."""
    with path.open(newline="") as f:
        return [dict(method=r["method"], rank=int(r["rank"]) if r["rank"] else "", mode=r.get("mode") or "clean",
                     quirks=r.get("quirks") or "", seed=int(r["seed"]), epoch=int(r["epoch"]),
                     val_acc50=float(r["val_acc50"]))
                for r in csv.DictReader(f)]


def gather(folders: Iterable[Path]) -> list[dict]:
    """Every run under `folders` (a folder with `.hydra/config.yaml` and `csv/metrics.csv`)."""
    lines = []
    for top in folders:
        for config in sorted(top.rglob(".hydra/config.yaml")):
            run = config.parent.parent
            if (run / "csv" / "metrics.csv").is_file():
                lines.extend(run_curve(run))
    return lines


def late_rise(values: list[float], window: int = 5) -> float:
    """Mean of the last `window` values minus the mean of the `window` values ten epochs earlier."""
    return statistics.fmean(values[-window:]) - statistics.fmean(values[-2 * window - 5:-window - 5])


def summary(lines: list[dict]) -> str:
    """Per method, rank, mode and quirks set: runs, best epoch (mean, range) and the late rise (mean, max over its
    runs)."""
    curves: dict[tuple, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in sorted(lines, key=lambda r: r["epoch"]):
        curves[(line["method"], line["rank"], line["mode"], line["quirks"])][line["seed"]].append(line["val_acc50"])
    out = ["| method | rank | mode | quirks set | runs | epochs | best epoch (mean, range) "
           "| val rise, last 10 epochs (mean, max) |", "|---|---:|---|---|---:|---:|---|---|"]
    for (method, rank, mode, quirks), seeds in sorted(curves.items(), key=lambda kv: tuple(map(str, kv[0]))):
        best = [max(range(len(v)), key=v.__getitem__) for v in seeds.values()]
        rises = [late_rise(v) for v in seeds.values() if len(v) >= 20]
        epochs = max(len(v) for v in seeds.values())
        rise = f"{statistics.fmean(rises):+.3f}, {max(rises):+.3f}" if rises else "-"
        out.append(f"| {method} | {rank or '-'} | {mode} | {quirks or '-'} | {len(seeds)} | {epochs} "
                   f"| {statistics.fmean(best):.1f} ({min(best)}-{max(best)}) | {rise} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--from", dest="previous", action="append", default=[], type=Path, metavar="CSV",
                        help="also the curves of a CSV written by --csv before (repeatable)")
    parser.add_argument("--csv", type=Path, help="write every run's curve here")
    args = parser.parse_args(argv)
    if not args.folders and not args.previous:
        parser.error("give run folders, or --from CSV")
    lines = gather(args.folders) + [line for path in args.previous for line in read_curves(path)]
    if not lines:
        print(f"no run folder with .hydra/config.yaml and csv/metrics.csv under {', '.join(map(str, args.folders))}",
              file=sys.stderr)
        return 1
    runs = Counter((r["method"], r["rank"], r["mode"], r["quirks"], r["seed"]) for r in lines if r["epoch"] == 0)
    twice = sorted((run for run, count in runs.items() if count > 1), key=str)
    if twice:
        method, rank, mode, quirks, seed = twice[0]
        print(f"{method} rank {rank or '-'} mode {mode}{' ' + quirks if quirks else ''} seed {seed} comes twice "
              "(two run folders, or a run folder and --from): give each run once", file=sys.stderr)
        return 1
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(sorted(lines, key=lambda r: (r["method"], str(r["rank"]), r["mode"], r["quirks"],
                                                          r["seed"], r["epoch"])))
    print(summary(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
