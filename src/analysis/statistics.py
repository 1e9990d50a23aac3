"""Is A better than B? Each group's Acc@0.5 with a 95% interval, and its paired difference to reference groups.

A group is a row of the results table (`src.analysis.table`: runs of one kind and recipe that differ only in their
seed). For every group and test split this module gives the mean Acc@0.5 over the seeds with its 95% interval,
and, against each reference (by default the `frozen` and `mapper` groups of the same benchmark, kind and
recipe but for the method's own settings), the difference of the means, paired by seed (the same seed of both
methods, on the same test set), with its 95% interval. A difference is *resolved* when its interval excludes 0.

Two methods, chosen per figure by what the runs recorded:

* `bootstrap`, when every run involved carries its per-sample outcomes (`sample_hits`, `src.analysis.samples`): a
  hierarchical bootstrap over seeds and test samples. Each of `replicates` replicates draws the seeds with
  replacement (for a difference: the paired seeds, each draw taking the seed's run of both methods) and the test
  samples with replacement; every seed and both methods are scored on the same drawn samples, because they share
  the test set (drawing samples separately per seed would treat each seed as tested on a set of its own and
  shrink the test-set part of the interval by the seed count). The interval is the 2.5 and 97.5 percentiles of
  the replicates' means. It covers both the seed-to-seed spread and the test set's sampling; with few seeds its
  seed part is too narrow (a bootstrap over R values keeps (R-1)/R of their variance and has few distinct draws).
* `t`, when some run lacks them (lines written before the record existed): a Student t interval over the seeds'
  Acc@0.5 (for a difference: over the paired seeds' differences), which treats the test set as fixed.

One seed (one pair) gives no interval. The random draws are deterministic: the test samples' draws are seeded by
the test set (benchmark, split, size), the seeds' by the groups compared, so adding rows to a table changes no
other row's interval (unless the new runs left out samples the others evaluated: those leave the bootstrap).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from src.analysis.samples import read_hits
from src.analysis.table import IDENTITY_SETTINGS, flatten, recipe_differences, setting_cell, split_names
from src.config import shipped_rank
from src.errors import ConfigError

LEVEL = 0.95
REPLICATES = 2000
BOOTSTRAP_SEED = 0
DEFAULT_AGAINST = ("frozen", "mapper")
# Student t quantiles for a two-sided 95% interval, 1-29 degrees of freedom; from 30 on `t_quantile` expands.
T_975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452)
Z_975 = 1.959963984540054
# Replicates x samples per block of the bootstrap's sample draws (bounds its memory: 4M float32 = 16 MB).
BLOCK_ELEMENTS = 4_000_000


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom: a table up to 29, then the Cornish-Fisher
    expansion around the normal quantile (error below 2e-6 from 30 on)."""
    if df < 1:
        raise ValueError("a t interval needs at least 1 degree of freedom")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass(frozen=True)
class Estimate:
    """A mean (of Acc@0.5, or of paired differences) over `seeds` seeds, with its 95% interval (None with one seed)
    and the method that gave it (`bootstrap`, `t`)."""

    value: float
    low: float | None
    high: float | None
    method: str
    seeds: int

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def t_estimate(values: Sequence[float]) -> Estimate:
    """Mean and Student t interval of per-seed figures."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return Estimate(mean, None, None, "t", len(x))
    half = t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Estimate(mean, mean - half, mean + half, "t", len(x))


def _rng(*key: Any) -> np.random.Generator:
    """A generator seeded by BOOTSTRAP_SEED and a stable digest of `key` (the same key, the same draws)."""
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).digest()
    return np.random.default_rng([BOOTSTRAP_SEED, int.from_bytes(digest[:8], "little")])


def resampled_means(rows: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """Each row's mean over each replicate's test samples, drawn with replacement (the same draw for every row):
    (replicates, rows). Vectorised in blocks of replicates: each block's draws become per-sample counts, and one
    matrix product scores every row on them."""
    n = rows.shape[1]
    matrix = rows.astype(np.float32).T
    out = np.empty((replicates, rows.shape[0]))
    block = max(1, BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, replicates, block):
        b = min(block, replicates - start)
        draws = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n).astype(np.float32)
        out[start:start + b] = (counts @ matrix) / n
    return out


def bootstrap_estimate(value: float, replicate_rows: np.ndarray, rng: np.random.Generator) -> Estimate:
    """The interval of a mean over seeds: `replicate_rows` (replicates, seeds) holds each seed's figure on each
    replicate's test samples; each replicate also draws the seeds with replacement."""
    replicates, seeds = replicate_rows.shape
    if seeds < 2:
        return Estimate(value, None, None, "bootstrap", seeds)
    drawn = rng.integers(0, seeds, size=(replicates, seeds))
    means = np.take_along_axis(replicate_rows, drawn, axis=1).mean(axis=1)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(value, float(low), float(high), "bootstrap", seeds)


@dataclass
class SeedOutcome:
    """A seed's Acc@0.5 on a split (averaged over its runs), and its per-sample outcomes when every one of those
    runs recorded them on the same test set: `test_set` (benchmark, split, size), `hits` and `evaluated` masks."""

    acc: float
    test_set: tuple[str, str, int] | None = None
    hits: np.ndarray | None = None
    evaluated: np.ndarray | None = None


def seed_outcomes(runs: Sequence[Mapping[str, Any]], split: str) -> dict[Any, SeedOutcome]:
    """A group's runs on `split` by seed (runs that did not test the split are left out)."""
    by_seed: dict[Any, list[Mapping[str, Any]]] = {}
    for run in runs:
        if (run.get("splits") or {}).get(split, {}).get("acc50") is not None:
            by_seed.setdefault(run.get("seed"), []).append(run)
    out = {}
    for seed, members in by_seed.items():
        acc = float(np.mean([m["splits"][split]["acc50"] for m in members]))
        records = [(m.get("sample_hits") or {}).get(split) for m in members]
        sizes = {int(r["size"]) for r in records if r}
        if all(records) and len(sizes) == 1:
            decoded = [read_hits(r) for r in records]
            evaluated = np.logical_and.reduce([e for e, _ in decoded])
            hits = np.mean([h for _, h in decoded], axis=0)
            out[seed] = SeedOutcome(acc, (str(members[0].get("benchmark")), split, sizes.pop()), hits, evaluated)
        else:
            out[seed] = SeedOutcome(acc)
    return out


@dataclass
class Row:
    """One row of the statistics table: a group (its results-table entry) on one split, its mean and its paired
    differences by reference name (an Estimate, or why there is none)."""

    entry: Mapping[str, Any]
    split: str
    mean: Estimate
    differences: dict[str, Estimate | str] = field(default_factory=dict)


def _same_but_method(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two groups differ at most in the method and its settings: known recipes equal outside `peft.*`,
    unknown ones (lines from before recipes) of the same experiment and mode."""
    ra, rb = a.get("recipe_settings"), b.get("recipe_settings")
    if ra is None or rb is None:
        return ra is None and rb is None and (a["experiment"], a["mode"]) == (b["experiment"], b["mode"])
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("peft.")}
    return strip(ra) == strip(rb)


def reference_for(entry: Mapping[str, Any], entries: Sequence[Mapping[str, Any]], name: str
                  ) -> Mapping[str, Any] | str:
    """The group `entry` is compared with for reference `name`: a recipe fingerprint names one group (of the same
    benchmark); a method name the group of that method with the same benchmark, kind and recipe but for the
    method's settings. Where that method ran at several ranks, one group is the reference for every row: the one
    at the rank its config ships with (`conf/peft/<name>.yaml`), else the one at `entry`'s rank. A string says
    why there is none (`reference`: `entry` is the reference)."""
    if name == entry["recipe"]:
        return "reference"
    if any(e["recipe"] == name for e in entries):
        found = [e for e in entries if e["recipe"] == name and e["benchmark"] == entry["benchmark"]]
    else:
        found = [e for e in entries if e["method"] == name and e["benchmark"] == entry["benchmark"]
                 and e["kind"] == entry["kind"] and _same_but_method(e, entry)]
        if len(found) > 1:
            shipped = shipped_rank(name)
            found = ([e for e in found if e.get("rank") == shipped] if shipped is not None else []) or [
                e for e in found if e.get("rank") == entry.get("rank")] or found
    if not found:
        return "-"
    if len(found) > 1:
        return f"{len(found)} {name} groups match (name one by its recipe)"
    return "reference" if found[0] is entry else found[0]


@dataclass(frozen=True)
class Resampled:
    """The recorded seeds of one test set: each one's Acc@0.5 on every bootstrap replicate's samples
    (`replicated`: replicates x rows) and on the test set itself (`figures`), and the row of each (group, seed)."""

    replicated: np.ndarray
    figures: np.ndarray
    rows: dict[tuple[str, Any], int]


class Statistics:
    """The statistics of a results table: its entries (`src.analysis.table.summarise`) and the runs they average."""

    def __init__(self, entries: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]],
                 replicates: int = REPLICATES) -> None:
        self.entries = list(entries)
        self.replicates = replicates
        self.members: dict[str, list[Mapping[str, Any]]] = {}
        for run in runs:
            self.members.setdefault(flatten(run)["group"], []).append(run)
        self._outcomes: dict[tuple[str, str], dict[Any, SeedOutcome]] = {}
        self._replicates: dict[tuple[str, str, int], Resampled] = {}

    def outcomes(self, entry: Mapping[str, Any], split: str) -> dict[Any, SeedOutcome]:
        """The group's seeds on `split` (cached)."""
        key = (entry["group"], split)
        if key not in self._outcomes:
            self._outcomes[key] = seed_outcomes(self.members.get(entry["group"], []), split)
        return self._outcomes[key]

    def _resampled(self, test_set: tuple[str, str, int]) -> Resampled:
        """Every recorded seed of every group on `test_set`, scored on the bootstrap's sample draws of that test
        set (cached). Samples that some run did not evaluate are left out."""
        if test_set not in self._replicates:
            rows, hits, evaluated = {}, [], []
            for entry in self.entries:
                for seed, o in self.outcomes(entry, test_set[1]).items():
                    if o.test_set == test_set:
                        rows[(entry["group"], seed)] = len(hits)
                        hits.append(o.hits)
                        evaluated.append(o.evaluated)
            matrix = np.stack(hits)[:, np.logical_and.reduce(evaluated)]
            replicated = resampled_means(matrix, self.replicates, _rng(*test_set))
            self._replicates[test_set] = Resampled(replicated, matrix.mean(axis=1), rows)
        return self._replicates[test_set]

    def _recorded(self, pairs: Iterable[tuple[Mapping[str, Any], Any]], split: str) -> tuple[str, str, int] | None:
        """The test set every (entry, seed) recorded its samples on, or None when one has no record or they differ."""
        sets = {self.outcomes(entry, split)[seed].test_set for entry, seed in pairs}
        return sets.pop() if len(sets) == 1 and None not in sets else None

    def mean(self, entry: Mapping[str, Any], split: str) -> Estimate | None:
        """The group's mean Acc@0.5 on `split` over its seeds, with its interval (None: the split was not tested)."""
        seeds = self.outcomes(entry, split)
        if not seeds:
            return None
        test_set = self._recorded(((entry, s) for s in seeds), split)
        if test_set is None:
            return t_estimate([o.acc for o in seeds.values()])
        resampled = self._resampled(test_set)
        rows = [resampled.rows[(entry["group"], s)] for s in seeds]
        return bootstrap_estimate(float(resampled.figures[rows].mean()), resampled.replicated[:, rows],
                                  _rng(entry["group"], split))

    def difference(self, entry: Mapping[str, Any], reference: Mapping[str, Any], split: str) -> Estimate | str:
        """The paired difference entry - reference on `split` over their common seeds, with its interval."""
        ours, theirs = self.outcomes(entry, split), self.outcomes(reference, split)
        paired = [s for s in ours if s in theirs and s is not None]
        if not paired:
            return "no common seed"
        test_set = self._recorded([(entry, s) for s in paired] + [(reference, s) for s in paired], split)
        if test_set is None:
            return t_estimate([ours[s].acc - theirs[s].acc for s in paired])
        resampled = self._resampled(test_set)
        a = [resampled.rows[(entry["group"], s)] for s in paired]
        b = [resampled.rows[(reference["group"], s)] for s in paired]
        value = float((resampled.figures[a] - resampled.figures[b]).mean())
        return bootstrap_estimate(value, resampled.replicated[:, a] - resampled.replicated[:, b],
                                  _rng(entry["group"], reference["group"], split))

    def table(self, against: Sequence[str] = DEFAULT_AGAINST, splits: Sequence[str] | None = None,
              strict: bool = False) -> tuple[list[str], list[Row]]:
        """The references shown (those of `against` that some group has; with `strict`, a missing one is an
        error) and a Row per group and split (`splits`, default every split tested)."""
        names = [n for n in against if any(n in (e["method"], e["recipe"]) for e in self.entries)]
        missing = [n for n in against if n not in names]
        if strict and missing:
            raise ConfigError(f"no group of method or recipe {', '.join(missing)} to compare against")
        rows = []
        for entry in self.entries:
            for split in splits or split_names([entry]):
                mean = self.mean(entry, split)
                if mean is None:
                    continue
                row = Row(entry, split, mean)
                for name in names:
                    ref = reference_for(entry, self.entries, name)
                    row.differences[name] = ref if isinstance(ref, str) else self.difference(entry, ref, split)
                rows.append(row)
        return names, rows


def method_text(replicates: int = REPLICATES) -> str:
    """What the statistics table's figures are, and how they were computed (printed above the table)."""
    return (
        f"Acc@0.5 per group and split: the mean over seeds with its 95% interval; Δ: the difference to a reference "
        f"group, paired by seed (same seed, same test set), with its 95% interval, *resolved* when that excludes 0. "
        f"bootstrap: hierarchical bootstrap from the runs' per-sample outcomes ({replicates} replicates, seed "
        f"{BOOTSTRAP_SEED}): each replicate draws the seeds, then the test samples, with replacement, one sample "
        f"draw shared by every seed and both methods (they share the test set); 2.5-97.5 percentiles. With few seeds "
        f"its seed part is too narrow. t: Student t interval over the seeds (over paired seed differences), where a "
        f"run has no per-sample record. One seed: no interval."
    )


def _number(x: float, signed: bool) -> str:
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def estimate_cell(value: Estimate | str, signed: bool = False, seeds: int | None = None) -> str:
    """An Estimate as a table cell: value [low, high], `resolved` for a difference whose interval excludes 0, the
    seed count when no interval or fewer pairs than the group's seeds."""
    if isinstance(value, str):
        return value
    if value.low is None or value.high is None:
        return f"{_number(value.value, signed)} ({value.seeds} {'pair' if signed else 'seed'}: no interval)"
    text = f"{_number(value.value, signed)} [{_number(value.low, signed)}, {_number(value.high, signed)}]"
    if signed and value.resolved:
        text += " resolved"
    if signed and seeds is not None and value.seeds < seeds:
        text += f" ({value.seeds} of {seeds} seeds paired)"
    return text


def _methods(row: Row) -> str:
    """The interval methods of a row's figures: one name when they agree, else per figure."""
    used = {"mean": row.mean.method} | {f"vs {k}": v.method for k, v in row.differences.items()
                                         if isinstance(v, Estimate)}
    if len(set(used.values())) == 1:
        return next(iter(used.values()))
    return "; ".join(f"{k}: {v}" for k, v in used.items())


def _identity(row: Row, differing: Sequence[str]) -> list[str]:
    """The cells that say which group and split a row is: as the results table, with the split."""
    e = row.entry
    return [str(e["benchmark"]), row.split, str(e["kind"]), str(e["recipe"]), str(e["method"]),
            "-" if e.get("rank") is None else str(e["rank"]), *[setting_cell(e, k) for k in differing]]


def format_statistics(names: Sequence[str], rows: Sequence[Row], fmt: str = "markdown") -> str:
    """The statistics table as markdown (cells as `estimate_cell`) or CSV (plain numbers: `acc50`, `acc50_low`,
    `acc50_high`, and per reference `vs_<name>`, `_low`, `_high`, `_resolved`, `_pairs`, `_method`)."""
    entries = list({id(r.entry): r.entry for r in rows}.values())
    differing = recipe_differences(entries, IDENTITY_SETTINGS)
    header = ["benchmark", "split", "kind", "recipe", "method", "rank", *differing]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow([*header, "seeds", "acc50", "acc50_low", "acc50_high", "acc50_method",
                         *[f"vs_{n}{s}" for n in names for s in ("", "_low", "_high", "_resolved", "_pairs",
                                                                   "_method")]])
        for r in rows:
            cells = [r.mean.seeds, r.mean.value, r.mean.low, r.mean.high, r.mean.method]
            for n in names:
                d = r.differences[n]
                cells += ([d.value, d.low, d.high, d.resolved, d.seeds, d.method] if isinstance(d, Estimate)
                          else [None, None, None, None, None, d])
            writer.writerow([*_identity(r, differing), *["" if c is None else c for c in cells]])
        return buf.getvalue()
    header += ["seeds", "Acc@0.5 [95% interval]", *[f"Δ vs {n} [95% interval]" for n in names], "interval"]
    rule = ["---"] * (len(header) - len(names) - 3) + ["---:"] * (len(names) + 2) + ["---"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for r in rows:
        seeds = r.mean.seeds
        cells = [*_identity(r, differing), str(seeds), estimate_cell(r.mean),
                 *[estimate_cell(r.differences[n], signed=True, seeds=seeds) for n in names], _methods(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The statistics' options of `python -m src.results`."""
    parser.add_argument("--against", default=None, metavar="NAMES",
                        help="comma-separated methods or recipe fingerprints to compare every group with "
                             f"(default: {','.join(DEFAULT_AGAINST)}, those present); '' for none")
    parser.add_argument("--split", action="append", default=[], help="only this test split (repeatable)")
    parser.add_argument("--stats", action="store_true",
                        help="print only the statistics table (with --format csv: as CSV)")
    parser.add_argument("--replicates", type=int, default=REPLICATES, help="bootstrap replicates")


def print_statistics(stats: Statistics, args: argparse.Namespace) -> None:
    """The statistics table as the options of `add_arguments` ask: after the results table in markdown, with the
    method's description; alone with `--stats` (as CSV with `--format csv`)."""
    if not (args.stats or args.format == "markdown"):
        return
    if args.against is None:
        names, strict = list(DEFAULT_AGAINST), False
    else:
        names, strict = [n.strip() for n in args.against.split(",") if n.strip()], True
    shown, rows = stats.table(names, args.split or None, strict)
    if args.format == "markdown":
        print(f"\n{method_text(stats.replicates)}\n")
    print(format_statistics(shown, rows, args.format))
