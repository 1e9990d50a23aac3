"""Figures of a results table: accuracy against tunable backbone parameters across ranks (the rank figure,
beside the MaPPER paper's Figure 1), and each group's mean with its paired differences (`src.analysis.statistics`).

`python -m src.results DIR --rank-figure out.png` writes the rank figure; the comparison notebook draws both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.analysis.statistics import Estimate, Row, Statistics
from src.analysis.table import recipe_differences, setting_cell, split_names
from src.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# The MaPPER paper's Figure 1 (RefCOCO val, DINOv2-B + BERT-B): method, tunable backbone parameters, Acc@0.5 (%),
# as its plotting script data-visual.py gives them (mapper-spec.md, "Figure 1 data"). One point per method: the
# ranks behind them are not given, and the paper's rank ablation is not among the verified figures.
PAPER_FIGURE_1 = (
    ("full fine-tuning", 196e6, 85.31), ("Adapter", 4.09e6, 83.23), ("LoRA", 3.25e6, 82.43),
    ("AdaptFormer", 4.09e6, 81.71), ("CM-Adapter", 4.09e6, 82.35), ("MRS-Adapter", 2.98e6, 81.52),
    ("MaPPER", 2.77e6, 86.38),
)
RANK_METHODS = ("lora", "adapter", "adaptformer", "mapper")


@dataclass(frozen=True)
class Point:
    """One group on the rank figure: its series (method and the settings that set it apart), rank, tunable
    backbone parameters and Acc@0.5 with its interval."""

    series: str
    method: str
    rank: int | None
    params: float
    acc: Estimate


def default_split(entries: Sequence[Mapping[str, Any]]) -> str | None:
    """`val` when the entries were tested on it (the paper's Figure 1 is RefCOCO val), else their first split."""
    names = split_names(entries)
    return "val" if "val" in names else (names[0] if names else None)


def entry_label(entry: Mapping[str, Any], differing: Sequence[str], rank: bool = True) -> str:
    """Method, rank, kind when not a training run, mode when not clean, and the recipe settings that tell the
    groups apart."""
    text = str(entry["method"])
    if rank and entry.get("rank") is not None:
        text += f" r={int(entry['rank'])}"
    if entry["kind"] != "training":
        text += f" [{entry['kind']}]"
    if entry.get("mode") not in (None, "clean"):
        text += f" [{entry['mode']}]"
    return text + "".join(f", {k.rsplit('.', 1)[-1]}={setting_cell(entry, k)}" for k in differing)


def label_settings(entries: Sequence[Mapping[str, Any]]) -> dict[int, list[str]]:
    """Per entry (by id), the recipe settings its label names: those that differ between groups of its own method
    and mode (a quirk set on one MaPPER group), not those that follow the mode (an official group's backbones)."""
    peers: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for e in entries:
        peers.setdefault((str(e["method"]), str(e.get("mode"))), []).append(e)
    varying = {group: recipe_differences(members) for group, members in peers.items()}
    return {id(e): varying[(str(e["method"]), str(e.get("mode")))] for e in entries}


def rank_points(stats: Statistics, benchmark: str, split: str,
                methods: Sequence[str] = RANK_METHODS) -> list[Point]:
    """The groups of `methods` on `benchmark` with an Acc@0.5 on `split`, ordered by series and parameters."""
    entries = [e for e in stats.entries if e["benchmark"] == benchmark and e["method"] in methods]
    labels = label_settings(entries)
    points = []
    for entry in entries:
        acc = stats.mean(entry, split)
        if acc is not None:
            points.append(Point(entry_label(entry, labels[id(entry)], rank=False), str(entry["method"]),
                                entry.get("rank"), float(entry.get("tunable_backbone", 0.0)), acc))
    return sorted(points, key=lambda p: (p.series, p.params))


def _errorbar(ax: Axes, xs: Sequence[float], estimates: Sequence[Estimate], scale: float = 1.0, **style: Any):
    """Points with asymmetric error bars from their intervals (none where an estimate has no interval)."""
    ys = [e.value * scale for e in estimates]
    below = [(e.value - e.low) * scale if e.low is not None else 0.0 for e in estimates]
    above = [(e.high - e.value) * scale if e.high is not None else 0.0 for e in estimates]
    return ax.errorbar(xs, ys, yerr=[below, above], capsize=4, **style)


def draw_rank_panel(ax: Axes, stats: Statistics, benchmark: str, split: str,
                    methods: Sequence[str] = RANK_METHODS) -> None:
    """Acc@0.5 (%) against tunable backbone parameters (log x), a line per method series through its ranks, with
    95% intervals; `frozen` (no tunable parameters) as a dashed line with its interval as a band."""
    points = rank_points(stats, benchmark, split, methods)
    for series in dict.fromkeys(p.series for p in points):
        members = [p for p in points if p.series == series and p.params > 0]
        if not members:
            continue
        _errorbar(ax, [p.params for p in members], [p.acc for p in members], 100, fmt="o-", label=series)
        for p in members:
            if p.rank is not None:
                ax.annotate(f"r={int(p.rank)}", (p.params, p.acc.value * 100), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    for entry in stats.entries:
        if entry["benchmark"] == benchmark and entry["method"] == "frozen":
            acc = stats.mean(entry, split)
            if acc is None:
                continue
            line = ax.axhline(acc.value * 100, ls="--", color="grey", label=entry_label(entry, []))
            if acc.low is not None:
                ax.axhspan(acc.low * 100, acc.high * 100, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ax.set_title(f"ours: {benchmark}, {split} (mean, 95% interval)")
    ax.set_xlabel("tunable backbone parameters")
    ax.set_ylabel("Acc@0.5 (%)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def draw_paper_panel(ax: Axes) -> None:
    """The paper's Figure 1 points (`PAPER_FIGURE_1`) on the same axes as `draw_rank_panel`."""
    ax.scatter([p for _, p, _ in PAPER_FIGURE_1], [a for _, _, a in PAPER_FIGURE_1], color="tab:red")
    for name, params, acc in PAPER_FIGURE_1:
        ax.annotate(name, (params, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_title("paper, Figure 1: RefCOCO val, full size (one point per method)")
    ax.set_xlabel("tunable backbone parameters")
    ax.set_ylabel("Acc@0.5 (%)")


def rank_figure(stats: Statistics, benchmark: str | None = None, split: str | None = None,
                methods: Sequence[str] = RANK_METHODS) -> Figure:
    """The rank figure: ours (`draw_rank_panel`; default: the first benchmark and `default_split`) beside the
    paper's Figure 1."""
    import matplotlib.pyplot as plt

    benchmark = benchmark or str(stats.entries[0]["benchmark"])
    ours = [e for e in stats.entries if e["benchmark"] == benchmark]
    split = split or default_split(ours)
    if not ours or split is None:
        raise ConfigError(f"no group of benchmark {benchmark!r} with a test split to draw")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    draw_rank_panel(left, stats, benchmark, split, methods)
    draw_paper_panel(right)
    fig.tight_layout()
    return fig


def comparison_figure(names: Sequence[str], rows: Sequence[Row]) -> Figure:
    """Each row's mean Acc@0.5 with its 95% interval (left) and its paired difference to each reference in `names`
    (a panel each; filled: resolved, the interval excludes 0), one line per row."""
    import matplotlib.pyplot as plt

    settings = label_settings(list({id(r.entry): r.entry for r in rows}.values()))
    labels = [f"{entry_label(r.entry, settings[id(r.entry)])} ({r.split})" for r in rows]
    ys = list(range(len(rows)))[::-1]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(5 + 4 * len(names), 1.5 + 0.35 * len(rows)), sharey=True,
                             squeeze=False)
    means = axes[0][0]
    for y, r in zip(ys, rows, strict=True):
        _errorbar_h(means, y, r.mean, "tab:blue", True)
    means.set_yticks(ys, labels, fontsize=8)
    means.set_xlabel("Acc@0.5 (mean, 95% interval)")
    for ax, name in zip(axes[0][1:], names, strict=True):
        for y, r in zip(ys, rows, strict=True):
            d = r.differences.get(name)
            if isinstance(d, Estimate):
                _errorbar_h(ax, y, d, "tab:green" if d.resolved else "tab:grey", d.resolved)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_xlabel(f"Δ vs {name} (paired by seed, 95% interval)")
    fig.tight_layout()
    return fig


def _errorbar_h(ax: Axes, y: float, estimate: Estimate, color: str, filled: bool) -> None:
    """One horizontal error bar at height `y`: the estimate and its interval (a bare marker without one)."""
    low = estimate.value - estimate.low if estimate.low is not None else 0.0
    high = estimate.high - estimate.value if estimate.high is not None else 0.0
    ax.errorbar([estimate.value], [y], xerr=[[low], [high]], fmt="o", color=color, capsize=3,
                markerfacecolor=color if filled else "white")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The rank figure's options of `python -m src.results`."""
    parser.add_argument("--rank-figure", metavar="PNG", help="also draw Acc@0.5 against tunable parameters per "
                        "rank (LoRA, Adapter, AdaptFormer, MaPPER) beside the paper's Figure 1 into this file")
    parser.add_argument("--benchmark", help="the rank figure's benchmark (default: the first found)")
    parser.add_argument("--rank-methods", default=",".join(RANK_METHODS), metavar="NAMES",
                        help="the rank figure's methods, comma-separated")


def write_rank_figure(stats: Statistics, args: argparse.Namespace) -> Path | None:
    """The rank figure as `--rank-figure` asks (its split: the first `--split`, else `default_split`)."""
    if not args.rank_figure:
        return None
    import matplotlib

    matplotlib.use("Agg")
    fig = rank_figure(stats, args.benchmark, (args.split or [None])[0],
                      [m.strip() for m in args.rank_methods.split(",") if m.strip()])
    path = Path(args.rank_figure)
    fig.savefig(path, dpi=120)
    print(f"rank figure written to {path}", file=sys.stderr)
    return path
