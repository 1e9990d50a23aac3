"""The results table: one JSON line per run, and `python -m src.results [DIR...]` to read them.

Every run appends one line to `results.jsonl` in its sweep folder (multirun) or its run folder: the
experiment, benchmark, PEFT method and its settings, parameter counts, checkpoint size, per-split
Acc@0.5 and mean IoU, shuffled-text Acc@0.5, best epoch, wall time, peak memory, seed and git commit.
The CLI finds every `results.jsonl` under the given folders and prints one row per configuration
(benchmark x method x settings), with mean +- std over seeds, as markdown or CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import json
import re
import resource
import statistics
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_NAME = "results.jsonl"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def hydra_choices() -> dict[str, str]:
    """The config-group choices of the running Hydra job (e.g. {"peft": "lora"}); empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def results_file(output_dir: Path) -> Path:
    """The sweep folder's results file in a multirun, else the run folder's."""
    from hydra.core.hydra_config import HydraConfig

    if in_multirun():
        return Path(HydraConfig.get().sweep.dir) / RESULTS_NAME
    return output_dir / RESULTS_NAME


def git_commit() -> str | None:
    """The checkout's commit (with `-dirty` when tracked files changed), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def reset_peak_memory() -> None:
    """Start a new peak-memory measurement: CUDA's peak statistics, and on Linux the process's RSS
    high-water mark (`/proc/self/clear_refs` 5), so that each job of a multirun counts its own peak."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):  # not Linux: ru_maxrss below is then the whole process's peak
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated when CUDA is in use, else the peak RSS since `reset_peak_memory`."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def method_name(config: Mapping[str, Any], choices: Mapping[str, str]) -> str:
    """The `peft` config chosen (e.g. `lora`), or the method's class name when run outside Hydra."""
    if "peft" in choices:
        return choices["peft"]
    target = str((config.get("peft") or {}).get("_target_", "unknown"))
    return target.rsplit(".", 1)[-1].lower()


def best_epoch(checkpoint: str | None) -> int | None:
    """The epoch a Lightning checkpoint was saved at (None without one)."""
    if not checkpoint or not Path(checkpoint).is_file() or Path(checkpoint).suffix != ".ckpt":
        return None
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True).get("epoch", -1))


def result_row(
    config: Mapping[str, Any], choices: Mapping[str, str], params: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, float]], shuffled: Mapping[str, Mapping[str, float]],
    best_val: float | None, checkpoint: str | None, wall_seconds: float, output_dir: Path,
    processes: int | None = None,
) -> dict[str, Any]:
    """One run's line of the results table; `processes`: how many (DDP) processes ran it."""
    peft = {k: v for k, v in (config.get("peft") or {}).items() if not k.startswith("_")}
    ckpt = Path(checkpoint) if checkpoint else None
    return {
        "experiment": config.get("task_name"),
        "benchmark": (config.get("data") or {}).get("dataset"),
        "method": method_name(config, choices),
        "rank": peft.get("rank"),
        "peft": peft,
        "model": choices.get("model"),
        "mode": (config.get("model") or {}).get("mode"),
        "trainable": params.get("trainable"),
        "tunable_backbone": params.get("tunable_backbone"),
        "backbone_total": params.get("backbone_total"),
        "tunable_backbone_pct": params.get("tunable_backbone_pct"),
        "checkpoint_bytes": ckpt.stat().st_size if ckpt and ckpt.is_file() else None,
        "splits": {k: dict(v) for k, v in splits.items()},
        "shuffled_text": {k: v["acc50"] for k, v in shuffled.items()},
        "best_val_acc50": best_val,
        "best_epoch": best_epoch(checkpoint),
        "wall_seconds": wall_seconds,
        "processes": processes,
        "peak_memory_bytes": peak_memory_bytes(),
        "seed": config.get("seed"),
        "git_commit": git_commit(),
        "output_dir": str(output_dir),
        "status": "ok",
    }


def append_result(path: Path, row: Mapping[str, Any]) -> Path:
    """Append one line under an exclusive lock (parallel sweep jobs share the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    return path


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every row of every `results*.jsonl` given or found under the given folders (a run counted once)."""
    rows, seen = [], set()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(root.rglob("results*.jsonl"))
        for file in files:
            for line in file.read_text().splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                key = (row.get("output_dir"), row.get("seed"), row.get("wall_seconds"))
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
    return rows


def flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's numbers as flat columns: `acc50/<split>`, `miou/<split>`, `shuffled/<split>`, ..."""
    flat = {k: row.get(k) for k in ("experiment", "benchmark", "method", "rank", "mode", "seed", "trainable",
                                     "tunable_backbone", "tunable_backbone_pct", "checkpoint_bytes",
                                     "best_val_acc50", "best_epoch", "wall_seconds", "peak_memory_bytes")}
    for split, m in (row.get("splits") or {}).items():
        flat[f"acc50/{split}"] = m.get("acc50")
        flat[f"miou/{split}"] = m.get("miou")
    for split, acc in (row.get("shuffled_text") or {}).items():
        flat[f"shuffled/{split}"] = acc
    flat["settings"] = settings_label(row)
    return flat


def settings_label(row: Mapping[str, Any]) -> str:
    """The method's settings that tell two configurations apart (everything but the layer lists' nulls)."""
    peft = row.get("peft") or {}
    return json.dumps({k: v for k, v in sorted(peft.items()) if v is not None}, sort_keys=True, default=str)


GROUP_KEYS = ("benchmark", "method", "mode", "settings")


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per configuration (benchmark, method, mode, settings): mean and std over its runs."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        flat = flatten(row)
        groups.setdefault(tuple(flat.get(k) for k in GROUP_KEYS), []).append(flat)
    out = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        entry["rank"] = members[0].get("rank")
        entry["runs"] = len(members)
        entry["seeds"] = sorted(m["seed"] for m in members if m.get("seed") is not None)
        numeric = sorted({k for m in members for k, v in m.items()
                          if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("seed", "rank")})
        for col in numeric:
            values = [float(m[col]) for m in members if isinstance(m.get(col), int | float)]
            entry[col] = statistics.fmean(values)
            entry[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return sorted(out, key=lambda e: (str(e["benchmark"]), -e.get("tunable_backbone", 0.0), str(e["method"])))


def _split_names(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    names = []
    for e in entries:
        for k in e:
            m = re.fullmatch(r"acc50/(.+)", k)
            if m and not k.endswith("_std") and m.group(1) not in names:
                names.append(m.group(1))
    return names


def table_rows(entries: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells: method, rank, tunable params, Acc@0.5 per split as mean +- std, ..."""
    splits = _split_names(entries)
    header = ["benchmark", "method", "rank", "mode", "runs", "tunable backbone", "%", "checkpoint MB",
              *[f"Acc@0.5 {s}" for s in splits], *[f"mIoU {s}" for s in splits],
              *[f"shuffled {s}" for s in splits], "best epoch", "wall s", "peak GiB"]

    def pm(e: Mapping[str, Any], col: str, scale: float = 1.0, digits: int = 3) -> str:
        if col not in e:
            return "-"
        text = f"{e[col] * scale:.{digits}f}"
        return text + (f" ± {e[col + '_std'] * scale:.{digits}f}" if e.get("runs", 1) > 1 else "")

    rows = []
    for e in entries:
        rows.append([
            str(e["benchmark"]), str(e["method"]), "-" if e.get("rank") is None else str(e["rank"]), str(e["mode"]),
            str(e["runs"]), f"{int(e.get('tunable_backbone', 0)):,}", f"{e.get('tunable_backbone_pct', 0):.2f}",
            "-" if "checkpoint_bytes" not in e else f"{e['checkpoint_bytes'] / 2**20:.2f}",
            *[pm(e, f"acc50/{s}") for s in splits], *[pm(e, f"miou/{s}") for s in splits],
            *[pm(e, f"shuffled/{s}") for s in splits], pm(e, "best_epoch", digits=1), pm(e, "wall_seconds", digits=0),
            pm(e, "peak_memory_bytes", 1 / 2**30, 2),
        ])
    return header, rows


def format_table(entries: Sequence[Mapping[str, Any]], fmt: str = "markdown") -> str:
    """The summary as a markdown table, or as CSV with every mean and `_std` column as plain numbers."""
    if fmt == "csv":
        columns = list(dict.fromkeys(k for e in entries for k in e))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in e.items()} for e in entries)
        return buf.getvalue()
    header, rows = table_rows(entries)
    rule = "|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the results found under the given folders (default: outputs/ and multirun/)."""
    parser = argparse.ArgumentParser(prog="python -m src.results", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="*", default=["outputs", "multirun"], help="folders or results.jsonl files")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    args = parser.parse_args(argv)
    rows = load_results(d for d in args.dirs if Path(d).exists())
    if not rows:
        print(f"no {RESULTS_NAME} found under {' '.join(args.dirs)}", file=sys.stderr)
        return 1
    print(format_table(summarise(rows), args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
