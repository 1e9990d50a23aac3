"""The results table: one JSON line per run, read back and grouped (`python -m src.results [DIR...]` prints it).

Every run appends one line to `results.jsonl` in its sweep folder (multirun) or its run folder: what the
run is (`kind`: training, evaluation of a checkpoint, debug), its recipe (every setting that decides what
it computes except the seed, and a fingerprint of them), the experiment, benchmark, PEFT method and its
settings, parameter counts, checkpoint size, per-split Acc@0.5 and mean IoU, every test sample's outcome,
shuffled-text Acc@0.5, best epoch, wall time, peak memory, seed and git commit. Reading finds every
`results.jsonl` under the given folders and groups the runs by kind x recipe, with mean +- std over seeds.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import re
import resource
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from src.config import LEGACY_METHOD_TARGETS, METHOD_BUILDER
from src.errors import ConfigError, UserError

RESULTS_NAME = "results.jsonl"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# What a line can be; the table shows the first two unless asked for more.
KINDS = ("training", "evaluation", "debug")
SHOWN_KINDS = ("training", "evaluation")
# The committed study: what the comparison notebook reads unless PETL_RESULTS says otherwise.
NOTEBOOK_SOURCES = ("experiments/petl_comparison",)

# Settings that are not part of a recipe: the seed, names, places, logging, and switches that change speed
# or memory but not what a run computes (fnmatch patterns over dotted keys). Everything else is, so that a
# new setting splits groups rather than silently merging them.
NOT_RECIPE = (
    "seed", "task_name", "tags", "train", "test", "ckpt_path", "resume_roots", "visualize", "shuffled_text_check",
    "optimized_metric", "plugins", "peft.name", "data.name",
    "paths.*", "logger.*", "hydra.*", "callbacks.*", "overflow_guard.*", "mode_defaults.*", "*._convert_",
    "*._partial_", "data.data_root", "data.split_root", "data.image_root", "data.reader.refer_root",
    "data.cache_dir", "data.num_workers", "data.pin_memory", "data.cache_samples", "data.cache_max_mb",
    "model.checkpointing", "model.prior_cache", "model.vision_prefix_cache", "model.cache_max_mb", "model.compile",
    "optim.optimizer.fused", "optim.optimizer.foreach", "trainer._target_", "trainer.default_root_dir",
    "trainer.accelerator", "trainer.strategy", "trainer.log_every_n_steps", "trainer.num_sanity_val_steps",
    "trainer.deterministic", "trainer.profiler", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.benchmark",
)
# ... except the callbacks' choice of the checkpoint that is tested.
RECIPE_CALLBACKS = ("callbacks.model_checkpoint.monitor", "callbacks.model_checkpoint.mode")
# Files that count by their name, not their folder: the backbone pretraining's cached weights are named by
# a digest of their settings, and live under each machine's own cache folder.
RECIPE_FILE_NAMES = ("model.*.init_checkpoint",)
# An evaluation's recipe is its checkpoint's, with these settings of the evaluation itself.
EVALUATION_SETTINGS = ("data", "eval_fp32", "trainer.precision", "trainer.limit_test_batches",
                       "trainer.fast_dev_run")


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
    """The method config's name (`peft.name`, e.g. `lora`); for a config without one, the `peft` config
    chosen, else the method's class name."""
    peft = config.get("peft") or {}
    if peft.get("name"):
        return str(peft["name"])
    if "peft" in choices:
        return choices["peft"]
    return str(peft.get("_target_", "unknown")).rsplit(".", 1)[-1].lower()


def best_epoch(checkpoint: str | None) -> int | None:
    """The epoch a Lightning checkpoint was saved at (None without one)."""
    if not checkpoint or not Path(checkpoint).is_file() or Path(checkpoint).suffix != ".ckpt":
        return None
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True).get("epoch", -1))


def run_kind(config: Mapping[str, Any], choices: Mapping[str, str]) -> str:
    """`debug` for a `debug=` config (their task names start with `debug`), fast_dev_run or overfit_batches;
    else `evaluation` when the run does not train (`train=false`), else `training`."""
    trainer = config.get("trainer") or {}
    if (choices.get("debug") or str(config.get("task_name") or "").startswith("debug")
            or trainer.get("fast_dev_run") or trainer.get("overfit_batches")):
        return "debug"
    return "training" if config.get("train", True) else "evaluation"


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted key: value}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(key: str, prefixes: Iterable[str]) -> bool:
    """Whether a dotted key is one of `prefixes` or inside one of them."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _recipe_only(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe settings of a flat config (RECIPE_FILE_NAMES as file names); unset ones (null, empty) are
    left out, so that a new setting that defaults to null does not change every fingerprint."""
    return {k: Path(str(v)).name if any(fnmatch(k, p) for p in RECIPE_FILE_NAMES) else v
            for k, v in sorted(_method_as_class(flat).items())
            if v is not None and v != {} and (k in RECIPE_CALLBACKS or not any(fnmatch(k, p) for p in NOT_RECIPE))}


# The class each suite method was configured by before the method registry, by registered name.
METHOD_CLASSES = {method: target for target, method in LEGACY_METHOD_TARGETS.items()}


def _method_as_class(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A suite method built by the registry's builder (`peft._target_` + `peft.method`) written as the class
    its config named before (`peft._target_` alone), so that a recipe keeps its fingerprint across that change."""
    method = flat.get("peft.method")
    if flat.get("peft._target_") != METHOD_BUILDER or method not in METHOD_CLASSES:
        return dict(flat)
    return {k: v for k, v in flat.items() if k != "peft.method"} | {"peft._target_": METHOD_CLASSES[method]}


def run_recipe(config: Mapping[str, Any], checkpoint_config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Every setting of a resolved config that decides what the run computes, except the seed (NOT_RECIPE
    lists what is left out). An evaluation of a checkpoint gets the checkpoint's training recipe with its
    own data and test settings (EVALUATION_SETTINGS), so that evaluating a run's checkpoint as the run
    tested it gives the run's recipe; None (unknown) when the checkpoint carries no config."""
    flat = _leaves(config)
    if config.get("train", True) or not config.get("ckpt_path"):
        return _recipe_only(flat)
    if not checkpoint_config:
        return None
    trained = {k: v for k, v in _leaves(checkpoint_config).items() if not _under(k, EVALUATION_SETTINGS)}
    return _recipe_only(trained | {k: v for k, v in flat.items() if _under(k, EVALUATION_SETTINGS)})


def recipe_id(settings: Mapping[str, Any]) -> str:
    """A short fingerprint of recipe settings (equal settings, equal fingerprint)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of a checkpoint's tensors (names, dtypes, shapes, bytes): the same weights from a
    `.ckpt`, a copy of it or its `.safetensors` export give the same digest."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def result_row(
    config: Mapping[str, Any], choices: Mapping[str, str], params: Mapping[str, Any],
    splits: Mapping[str, Mapping[str, float]], shuffled: Mapping[str, Mapping[str, float]],
    best_val: float | None, checkpoint: str | None, wall_seconds: float, output_dir: Path,
    processes: int | None = None, checkpoint_config: Mapping[str, Any] | None = None, weights: str | None = None,
    sample_hits: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """One run's line of the results table; `processes`: how many (DDP) processes ran it; for an evaluation,
    `checkpoint_config` is the config its checkpoint carries and `weights` the digest of its tensors;
    `sample_hits`: each test split's per-sample Acc@0.5 outcomes (`src.analysis.samples.hit_record`)."""
    peft = {k: v for k, v in (config.get("peft") or {}).items() if not k.startswith("_")}
    data = config.get("data") or {}
    ckpt = Path(checkpoint) if checkpoint else None
    recipe = run_recipe(config, checkpoint_config)
    return {
        "experiment": config.get("task_name"),
        "kind": run_kind(config, choices),
        "recipe": recipe_id(recipe) if recipe is not None else None,
        # the data= config's name (two configs can read one dataset: synthetic and synthetic_shift)
        "benchmark": data.get("name") or data.get("dataset"),
        "method": method_name(config, choices),
        "rank": peft.get("rank"),
        "peft": peft,
        "model": choices.get("model"),
        "mode": (config.get("model") or {}).get("mode"),
        "trainable": params.get("trainable"),
        "tunable_backbone": params.get("tunable_backbone"),
        "backbone_total": params.get("backbone_total"),
        "tunable_backbone_pct": params.get("tunable_backbone_pct"),
        "checkpoint": str(ckpt) if ckpt else None,
        "weights": weights,
        "checkpoint_bytes": ckpt.stat().st_size if ckpt and ckpt.is_file() else None,
        "splits": {k: dict(v) for k, v in splits.items()},
        "shuffled_text": {k: v["acc50"] for k, v in shuffled.items()},
        "sample_hits": dict(sample_hits or {}),
        "best_val_acc50": best_val,
        "best_epoch": best_epoch(checkpoint),
        "wall_seconds": wall_seconds,
        "processes": processes,
        "peak_memory_bytes": peak_memory_bytes(),
        "seed": config.get("seed"),
        "git_commit": git_commit(),
        "output_dir": str(output_dir),
        "status": "ok",
        "recipe_settings": recipe,
    }


def append_result(path: Path, row: Mapping[str, Any]) -> Path:
    """Append one line under an exclusive lock (parallel sweep jobs share the file). The lock is taken on the
    results file itself (`fcntl.flock`), not through filelock, which would leave a `.lock` file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)
    return path


class NoRunsFound(UserError):
    """No run to show in the places read (the message says which files were read and what was left out)."""


@dataclass
class Collected:
    """What `read_results` found: every run once, the files read with their line counts, missing paths."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    read_twice: int = 0


def read_results(paths: Iterable[str | Path]) -> Collected:
    """Every line of every `results*.jsonl` given or found under the given folders, a run counted once
    (a file given and its folder), each completed by `complete` when written before kinds and recipes."""
    found, seen = Collected(), set()
    for root in map(Path, paths):
        if not root.exists():
            found.missing.append(str(root))
            continue
        for file in [root] if root.is_file() else sorted(root.rglob("results*.jsonl")):
            lines = [(i, line) for i, line in enumerate(file.read_text().splitlines(), 1) if line.strip()]
            found.files[str(file)] = len(lines)
            for number, line in lines:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{file}:{number} is not a results line ({err})") from None
                key = (row.get("output_dir"), row.get("seed"), row.get("wall_seconds"))
                if key in seen:
                    found.read_twice += 1
                    continue
                seen.add(key)
                found.runs.append(complete(row, file))
    return found


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every run found under `paths` (see `read_results`), as one dict each."""
    return read_results(paths).runs


def run_folder_config(row: Mapping[str, Any], file: Path | None) -> dict[str, Any] | None:
    """The config in the results.json of a line's run (found by its output_dir, or beside the results file
    when the folder moved), when that results.json records the same wall time as the line."""
    out = Path(str(row.get("output_dir") or ""))
    candidates = [out] + ([file.parent / out.name, file.parent] if file is not None else [])
    for folder in dict.fromkeys(candidates):
        with contextlib.suppress(OSError, ValueError):
            written = json.loads((folder / "results.json").read_text())
            if written.get("wall_seconds") == row.get("wall_seconds") and isinstance(written.get("config"), dict):
                return written["config"]
    return None


def complete(row: dict[str, Any], file: Path | None = None) -> dict[str, Any]:
    """A line as this version writes it. A line written before kinds and recipes were recorded gets them
    from its run's config (its results.json, when found: `derived_from: results.json`); without it, its
    kind is guessed (a `debug*` experiment is debug, a run without a best validation score an evaluation)
    and its recipe is unknown (`derived_from: guess`)."""
    if "kind" in row:
        return row
    config = run_folder_config(row, file)
    if config is not None:
        recipe = run_recipe(config)  # an evaluation's checkpoint is not read here: its recipe stays unknown
        evaluation = not config.get("train", True)
        return row | {"kind": run_kind(config, {}), "recipe": recipe_id(recipe) if recipe is not None else None,
                      "recipe_settings": recipe, "checkpoint": config.get("ckpt_path") if evaluation else None,
                      "derived_from": "results.json"}
    if str(row.get("experiment") or "").startswith("debug"):
        kind = "debug"
    else:
        kind = "training" if row.get("best_val_acc50") is not None else "evaluation"
    return row | {"kind": kind, "recipe": None, "recipe_settings": None, "derived_from": "guess"}


def select_runs(runs: Sequence[Mapping[str, Any]], include: Iterable[str] = SHOWN_KINDS
                ) -> tuple[list[dict[str, Any]], Counter[str]]:
    """The runs the table averages, and how many were left out and why: failed runs, kinds not asked for,
    and evaluations of weights already counted in the same recipe (the last one read counts)."""
    include = set(include)
    kept: list[dict[str, Any]] = []
    evaluated: dict[tuple, int] = {}
    left_out: Counter[str] = Counter()
    for row in map(complete, map(dict, runs)):
        if row.get("status", "ok") != "ok":
            left_out["failed"] += 1
        elif row["kind"] not in include:
            left_out[row["kind"]] += 1
        elif row["kind"] == "evaluation" and (row.get("weights") or row.get("checkpoint")):
            key = (row.get("recipe"), row.get("benchmark"), row.get("weights") or row.get("checkpoint"))
            if key in evaluated:
                kept[evaluated[key]] = row
                left_out["re-evaluation"] += 1
            else:
                evaluated[key] = len(kept)
                kept.append(row)
        else:
            kept.append(row)
    return kept, left_out


def settings_label(row: Mapping[str, Any]) -> str:
    """The method's settings that tell two configurations apart (everything but the layer lists' nulls)."""
    peft = row.get("peft") or {}
    return json.dumps({k: v for k, v in sorted(peft.items()) if v is not None}, sort_keys=True, default=str)


def flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's numbers as flat columns (`acc50/<split>`, `miou/<split>`, `shuffled/<split>`, ...) and its
    group: kind and recipe, or for a recipe unknown kind, experiment, benchmark, method, mode and settings."""
    flat = {k: row.get(k) for k in ("experiment", "kind", "recipe", "benchmark", "method", "rank", "mode", "seed",
                                     "trainable", "tunable_backbone", "tunable_backbone_pct", "checkpoint_bytes",
                                     "best_val_acc50", "best_epoch", "wall_seconds", "processes",
                                     "peak_memory_bytes")}
    for split, m in (row.get("splits") or {}).items():
        flat[f"acc50/{split}"] = m.get("acc50")
        flat[f"miou/{split}"] = m.get("miou")
    for split, acc in (row.get("shuffled_text") or {}).items():
        flat[f"shuffled/{split}"] = acc
    flat["settings"] = settings_label(row)
    flat["recipe"] = row.get("recipe") or "unknown"
    unknown = [row.get(k) for k in ("experiment", "benchmark", "method", "mode")] + [flat["settings"]]
    flat["group"] = json.dumps([flat["kind"], row.get("recipe") or unknown], default=str)
    return flat


ENTRY_KEYS = ("benchmark", "kind", "recipe", "method", "rank", "mode", "experiment", "settings")


def summarise(rows: Sequence[Mapping[str, Any]], include: Iterable[str] = SHOWN_KINDS) -> list[dict[str, Any]]:
    """One entry per group of runs that differ only in their seed (`select_runs` picks the runs): its
    kind, recipe, method, the mean and `_std` of every number over its runs, its seeds, its recipe
    settings (`recipe_settings`, None when unknown) for `recipe_differences`, and its `group` (`flatten`'s key)."""
    runs, _ = select_runs(rows, include)
    if not runs:
        return []
    flats = [flatten(r) for r in runs]
    frame = pd.DataFrame(flats)
    entries = []
    for group, members in frame.groupby("group", sort=False):
        first = members.index[0]
        entry: dict[str, Any] = {k: flats[first][k] for k in ENTRY_KEYS}
        entry["runs"] = len(members)
        entry["seeds"] = sorted(int(s) for s in members["seed"].dropna())
        numbers = members.drop(columns=["seed", "rank"]).select_dtypes("number")
        for col in numbers.columns:
            values = numbers[col].dropna()
            if len(values):
                entry[col] = float(values.mean())
                entry[f"{col}_std"] = float(values.std()) if len(values) > 1 else 0.0
        entry["recipe_settings"] = runs[first].get("recipe_settings")
        entry["group"] = group
        entries.append(entry)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(entries, key=lambda e: (str(e["benchmark"]), order.get(e["kind"], len(KINDS)),
                                          -e.get("tunable_backbone", 0.0), str(e["method"]), str(e["recipe"])))


# Recipe settings the table shows as columns already (benchmark, mode, method, rank).
SHOWN_SETTINGS = ("data.dataset", "data.mode", "model.mode", "peft._target_", "peft.method", "peft.rank")
# Those the statistics table shows (it has no mode column of its own: it names the mode where it differs).
IDENTITY_SETTINGS = tuple(k for k in SHOWN_SETTINGS if k != "model.mode")


def recipe_differences(entries: Sequence[Mapping[str, Any]], shown: Sequence[str] = SHOWN_SETTINGS) -> list[str]:
    """The recipe settings whose values differ between the entries (known recipes only), except those
    shown already (`shown`); a method's own settings (`peft.*`) only where they differ within a method."""
    known = [e for e in entries if e.get("recipe_settings") is not None]
    keys = sorted({k for e in known for k in e["recipe_settings"]})

    def values(members: Iterable[Mapping[str, Any]], key: str) -> set[str]:
        return {json.dumps(e["recipe_settings"].get(key), default=str) for e in members}

    methods: dict[str, list[Mapping[str, Any]]] = {}
    for e in known:
        methods.setdefault(str(e["method"]), []).append(e)
    out = []
    for key in keys:
        if key in shown:
            continue
        if key.startswith("peft."):
            if any(len(values(group, key)) > 1 for group in methods.values()):
                out.append(key)
        elif len(values(known, key)) > 1:
            out.append(key)
    return out


def setting_cell(entry: Mapping[str, Any], key: str) -> str:
    """A recipe setting as a table cell: `?` for an unknown recipe, `-` when the recipe has no such setting."""
    settings = entry.get("recipe_settings")
    if settings is None:
        return "?"
    if key not in settings:
        return "-"
    value = settings[key]
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def split_names(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The test splits the entries have Acc@0.5 for, in the order first found."""
    names = []
    for e in entries:
        for k in e:
            m = re.fullmatch(r"acc50/(.+)", k)
            if m and not k.endswith("_std") and m.group(1) not in names:
                names.append(m.group(1))
    return names


def table_rows(entries: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells: kind, recipe, method, rank, the recipe settings that differ between the
    rows, tunable params, checkpoint MiB, Acc@0.5 per split as mean +- std, ..."""
    splits, differing = split_names(entries), recipe_differences(entries)
    header = ["benchmark", "kind", "recipe", "method", "rank", "mode", *differing, "runs", "tunable backbone", "%",
              "checkpoint MiB", *[f"Acc@0.5 {s}" for s in splits], *[f"mIoU {s}" for s in splits],
              *[f"shuffled {s}" for s in splits], "best epoch", "wall s", "peak GiB"]

    def pm(e: Mapping[str, Any], col: str, scale: float = 1.0, digits: int = 3) -> str:
        if col not in e:
            return "-"
        text = f"{e[col] * scale:.{digits}f}"
        return text + (f" ± {e[col + '_std'] * scale:.{digits}f}" if e.get("runs", 1) > 1 else "")

    rows = []
    for e in entries:
        rows.append([
            str(e["benchmark"]), str(e["kind"]), str(e["recipe"]), str(e["method"]),
            "-" if e.get("rank") is None else str(e["rank"]), str(e["mode"]), *[setting_cell(e, k) for k in differing],
            str(e["runs"]), f"{int(e.get('tunable_backbone', 0)):,}", f"{e.get('tunable_backbone_pct', 0):.2f}",
            "-" if "checkpoint_bytes" not in e else f"{e['checkpoint_bytes'] / 2**20:.2f}",
            *[pm(e, f"acc50/{s}") for s in splits], *[pm(e, f"miou/{s}") for s in splits],
            *[pm(e, f"shuffled/{s}") for s in splits], pm(e, "best_epoch", digits=1), pm(e, "wall_seconds", digits=0),
            pm(e, "peak_memory_bytes", 1 / 2**30, 2),
        ])
    return header, rows


def format_table(entries: Sequence[Mapping[str, Any]], fmt: str = "markdown") -> str:
    """The summary as a markdown table, or as CSV with every mean and `_std` column as plain numbers and
    the recipe settings that differ between the rows as columns."""
    if fmt == "csv":
        differing = recipe_differences(entries)
        table = [{k: v for k, v in e.items() if k not in ("recipe_settings", "group")}
                 | {k: setting_cell(e, k) for k in differing}
                 for e in entries]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for e in table for k in e)))
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in e.items()} for e in table)
        return buf.getvalue()
    header, rows = table_rows(entries)
    rule = "|" + "|".join("---" if i < 6 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """`1 run`, `2 runs`: a count with its noun in the right number."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def describe(found: Collected, runs: Sequence[Mapping[str, Any]], left_out: Mapping[str, int], groups: int,
             show_more: str) -> str:
    """What was read and what the table holds: files with their line counts, paths not found, runs and
    groups, what was left out and why (`show_more`: how to ask for debug runs), recipes unknown."""
    files = [f"{path} ({counted(n, 'line')})" for path, n in found.files.items()]
    listed = ", ".join(files[:8]) + (f" and {len(files) - 8} more" if len(files) > 8 else "")
    lines = [f"read {counted(len(files), 'results file')}: {listed or 'none'}"]
    if found.missing:
        lines.append(f"not found: {', '.join(found.missing)}")
    nouns = {"failed": ("failed run", None), "debug": ("debug run", None), "evaluation": ("evaluation", None),
             "training": ("training run", None),
             "re-evaluation": ("evaluation of weights already counted", "evaluations of weights already counted")}
    notes = {"debug": f" ({show_more} shows them)", "re-evaluation": " (the last one read counts)"}
    dropped = [counted(n, *nouns.get(k, (k, None))) + notes.get(k, "") for k, n in left_out.items()]
    if found.read_twice:
        dropped.append(f"{counted(found.read_twice, 'line')} read twice")
    lines.append(f"{counted(len(runs), 'run')} in {counted(groups, 'group')}; left out: {', '.join(dropped) or 'none'}")
    unknown = sum(1 for r in runs if not r.get("recipe"))
    if unknown:
        lines.append(f"{counted(unknown, 'run')} of unknown recipe (lines written before recipes were recorded, "
                     "without their run's results.json): grouped by kind, experiment, benchmark, method, mode and "
                     "settings")
    return "\n".join(lines)


def load_runs(sources: Iterable[str | Path], include: Iterable[str] = SHOWN_KINDS,
              show_more: str = "--include debug") -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Read, select and summarise the runs under `sources`: the runs the table averages, its entries and
    `describe`'s text. Raises NoRunsFound (with that text) when no run is left to show."""
    include = tuple(include)
    unknown = sorted(set(include) - set(KINDS))
    if unknown:
        raise ConfigError(f"unknown kind of run {unknown}: the kinds are {', '.join(KINDS)}")
    found = read_results(sources)
    runs, left_out = select_runs(found.runs, include)
    entries = summarise(found.runs, include)
    text = describe(found, runs, left_out, len(entries), show_more)
    if not runs:
        raise NoRunsFound(f"found 0 runs to show\n{text}")
    return runs, entries, text


def load_table(sources: Iterable[str | Path], include: Iterable[str] = SHOWN_KINDS,
               show_more: str = "--include debug") -> tuple[list[dict[str, Any]], str]:
    """The table's entries and `describe`'s text for the runs under `sources` (see `load_runs`)."""
    _, entries, text = load_runs(sources, include, show_more)
    return entries, text


def resolve_sources(spec: str | None, default: Sequence[str] = NOTEBOOK_SOURCES) -> list[Path]:
    """Space-separated folders or files (else `default`); relative ones are taken from the suite's folder
    (PROJECT_ROOT), not from the working directory, so that a notebook reads the same from anywhere."""
    names = (spec or "").split() or list(default)
    return [path if path.is_absolute() else PROJECT_ROOT / path for path in (Path(n).expanduser() for n in names)]
