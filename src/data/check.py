"""The data doctor: checks a benchmark's splits, images, boxes and phrases before you train on them.

    python -m src.data.check data=<benchmark> [data.<key>=<value> ...] [output=json] [max_open=N] [splits=a,b]
    python -m src.data.check split_file=PATH [dataset=<key>] [box_format=xyxy|xywh] [output=json]

The first form composes the project's Hydra config (so `data=` and overrides work exactly as in a run)
and reports per split: records, distinct images, missing/unreadable images, degenerate boxes, boxes
outside their image, empty phrases and phrases longer than the query length. The second form reads one
split file and reports its record count, box format (declared or detected) and first record, even when
no images are present. Exit status: 0 = every split usable, 1 = some split unusable, 2 = bad arguments.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from src.data.benchmarks import BENCHMARKS, BOX_FORMATS, COCO_IMAGES, MAPPER_COCO_IMAGES, get_benchmark
from src.data.readers import (
    SplitFileError,
    convert_raw,
    detect_box_format,
    is_degenerate,
    jsonl_declared_format,
    load_transvg_raw,
    read_jsonl,
)
from src.data.records import Record
from src.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DOCTOR_OPTIONS = ("output", "max_open", "splits", "split_file", "dataset", "box_format")
DEFAULT_MAX_OPEN = 500
OUTSIDE_TOLERANCE = (
    1.0  # px a box may exceed its image before it counts as outside (rounding, inclusive ends)
)
TOKEN_CHUNK = 1024
TOKEN_LIMIT = 512


class UsageError(UserError, ValueError):
    """Bad command-line arguments or configuration (exit status 2)."""


@dataclass
class SplitReport:
    """What the doctor found in one split; `problems` make it unhealthy, `usable` False makes it unusable."""

    split: str
    file: str
    usable: bool = True
    records: int = 0
    images: int = 0
    missing_images: int = 0
    unreadable_images: int = 0
    opened_images: int = 0
    degenerate_boxes: int = 0
    boxes_outside_image: int = 0
    boxes_checked_against_image: int = 0
    empty_phrases: int = 0
    long_phrases: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def unusable(self, reason: str) -> None:
        """Mark the split unusable for the given reason."""
        self.usable = False
        self.problems.append(reason)


@dataclass
class ImageCheck:
    """Existence and readability of a split's distinct images; sizes of those opened."""

    missing: list[str]
    unreadable: list[str]
    sizes: dict[str, tuple[int, int]]


# ------------------------------------------------------------------------------------------- checks


def check_images(image_root: Path, images: Sequence[str], max_open: int) -> ImageCheck:
    """Stat every image; open and verify the first max_open present ones with PIL (negative = all)."""
    missing = [name for name in images if not (image_root / name).is_file()]
    missing_set = set(missing)
    present = [name for name in images if name not in missing_set]
    to_open = present if max_open < 0 else present[:max_open]
    unreadable: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    for name in to_open:
        try:
            with Image.open(image_root / name) as image:
                sizes[name] = image.size
                image.verify()
        except (OSError, SyntaxError, ValueError):
            unreadable.append(name)
            sizes.pop(name, None)
    return ImageCheck(missing, unreadable, sizes)


def outside_image(box: Sequence[float], size: tuple[int, int]) -> bool:
    """Whether a box extends past its image by more than the tolerance."""
    width, height = size
    x1, y1, x2, y2 = box
    tol = OUTSIDE_TOLERANCE
    return x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol


def wordpiece_lengths(phrases: Sequence[str], bert: Any) -> list[int]:
    """BERT token counts incl. [CLS]/[SEP] (capped at 512), via the contract's tok(phrases, max_len)."""
    lengths: list[int] = []
    for start in range(0, len(phrases), TOKEN_CHUNK):
        _, mask = bert(list(phrases[start : start + TOKEN_CHUNK]), TOKEN_LIMIT)
        lengths.extend(mask.sum(dim=1).tolist())
    return lengths


def _example(records: Sequence[Record], indices: Sequence[int]) -> str:
    """The first offending record, for a problem message."""
    i = indices[0]
    r = records[i]
    return f"e.g. record {i} ({r.image}, box {[round(v, 2) for v in r.box]}, phrase {r.phrase!r})"


def _count_problem(report: SplitReport, records: Sequence[Record], indices: Sequence[int], what: str) -> None:
    """Record a counted problem with its first example."""
    if indices:
        report.problems.append(f"{what}: {len(indices)}, {_example(records, indices)}")


def check_records(report: SplitReport, records: Sequence[Record], images: ImageCheck) -> None:
    """Box and phrase checks that need no tokenizer: degenerate, outside the image, empty phrase."""
    degenerate = [i for i, r in enumerate(records) if is_degenerate(r.box)]
    sized = [i for i, r in enumerate(records) if r.image in images.sizes]
    outside = [i for i in sized if outside_image(records[i].box, images.sizes[records[i].image])]
    empty = [i for i, r in enumerate(records) if not r.phrase.strip()]
    report.degenerate_boxes, report.boxes_outside_image = len(degenerate), len(outside)
    report.boxes_checked_against_image, report.empty_phrases = len(sized), len(empty)
    _count_problem(report, records, degenerate, "degenerate boxes (zero or negative width/height)")
    _count_problem(report, records, outside, "boxes outside their image")
    _count_problem(report, records, empty, "empty phrases")
    if records and len(degenerate) == len(records):
        report.unusable("every box is degenerate")


def check_phrase_lengths(report: SplitReport, records: Sequence[Record], bert: Any, max_len: int) -> None:
    """Count phrases longer than max_len BERT tokens (they are truncated; a note, not a problem)."""
    long = [i for i, n in enumerate(wordpiece_lengths([r.phrase for r in records], bert)) if n > max_len]
    report.long_phrases = len(long)
    if long:
        report.notes.append(
            f"phrases longer than max_query_len={max_len} BERT tokens incl. [CLS]/[SEP] (truncated when "
            f"training): {len(long)}, {_example(records, long)}"
        )


def check_image_report(report: SplitReport, image_root: Path, images: ImageCheck) -> None:
    """Fill the image counts; no readable image at all makes the split unusable."""
    report.missing_images, report.unreadable_images = len(images.missing), len(images.unreadable)
    report.opened_images = len(images.sizes) + len(images.unreadable)
    if images.missing:
        report.problems.append(
            f"missing images: {len(images.missing)} of {report.images}, e.g. {image_root / images.missing[0]}"
        )
    if images.unreadable:
        report.problems.append(
            f"unreadable images: {len(images.unreadable)} of {report.opened_images} opened, "
            f"e.g. {image_root / images.unreadable[0]}"
        )
    if report.images and len(images.missing) + len(images.unreadable) == report.images:
        report.unusable(f"no readable image under {image_root}")


def check_split(dm: Any, split: str, max_open: int, bert: Any) -> SplitReport:
    """All checks of one split of a configured datamodule."""
    report = SplitReport(split, str(dm.split_file(split)))
    try:
        records = dm.read_split(split)
    except (FileNotFoundError, SplitFileError) as err:
        report.unusable(str(err))
        return report
    report.records = len(records)
    if not records:
        report.unusable("the split has no records")
        return report
    names = list(dict.fromkeys(r.image for r in records))
    report.images = len(names)
    images = check_images(dm.image_root, names, max_open)
    check_image_report(report, dm.image_root, images)
    check_records(report, records, images)
    check_phrase_lengths(report, records, bert, dm.max_query_len)
    return report


def missing_image_hints(dm: Any, reports: Sequence[SplitReport]) -> list[str]:
    """Hints for the usual causes of missing images (wrong root; MaPPER's vs TransVG's COCO folder)."""
    if not any(r.missing_images for r in reports):
        return []
    hints = []
    if not dm.image_root.is_dir():
        hints.append(
            f"the image folder {dm.image_root} does not exist; set data.image_root or data.data_root"
        )
    if dm.spec.image_dir == COCO_IMAGES and dm.data_root is not None:
        alternative = dm.data_root / MAPPER_COCO_IMAGES
        found = " (it exists here)" if alternative.is_dir() else ""
        hints.append(
            f"COCO images are expected in <data_root>/{COCO_IMAGES} (TransVG's layout); MaPPER's code uses "
            f"<data_root>/{MAPPER_COCO_IMAGES}{found}: set data.image_root={alternative} or make a symlink"
        )
    return hints


def check_benchmark(dm: Any, max_open: int, splits: Sequence[str] | None = None) -> dict[str, Any]:
    """Check every configured split (train, val, tests) of a datamodule; return the JSON-able report."""
    from src.data.tokenizers import bert_tokenizer

    dm.prepare_data()
    wanted = list(splits) if splits else list(dict.fromkeys([dm.train_split, dm.val_split, *dm.test_splits]))
    bert = bert_tokenizer(dm.bert_vocab)
    reports = [check_split(dm, split, max_open, bert) for split in wanted]
    return {
        "dataset": dm.spec.key,
        "split_root": str(dm.split_root),
        "image_root": str(dm.image_root),
        "max_query_len": dm.max_query_len,
        "usable": all(r.usable for r in reports),
        "splits": {r.split: asdict(r) for r in reports},
        "hints": missing_image_hints(dm, reports),
    }


def _first(record: Record) -> dict[str, Any]:
    """The normalised form of a record for the single-file report."""
    return {"image": record.image, "bbox_xyxy": [round(v, 6) for v in record.box], "phrase": record.phrase}


def check_single_file(path: Path, dataset: str | None, box_format: str | None) -> dict[str, Any]:
    """Read one split file (no images needed): record count, box format (declared/detected), first record."""
    report: dict[str, Any] = {"file": str(path), "dataset": dataset}
    try:
        records = _read_single(report, path, dataset, box_format)
    except (FileNotFoundError, SplitFileError) as err:
        report.update(usable=False, error=str(err), records=0, first=None)
        return report
    report["records"] = len(records)
    report["first"] = _first(records[0]) if records else None
    report["usable"] = bool(records)
    return report


def _read_single(
    report: dict[str, Any], path: Path, dataset: str | None, box_format: str | None
) -> list[Record]:
    """Read a single split file, noting in report which box format was used and why."""
    if path.suffix == ".jsonl":
        header = jsonl_declared_format(path)
        used = header or box_format or "xyxy"
        records = read_jsonl(path, used)
        source = "file header" if header else "declared" if box_format else "default"
        report.update(box_format=used, box_format_source=source)
    else:
        raw = load_transvg_raw(path)
        detected = detect_box_format([r.box for r in raw])
        declared = box_format or (get_benchmark(dataset).box_format if dataset else None)
        used = declared or detected.box_format
        report.update(box_format=used, box_format_source="declared" if declared else "detected")
        report["detected"] = asdict(detected)
        if declared and declared != detected.box_format:
            report["warning"] = f"declared {declared} but the boxes look like {detected.box_format}"
        records = convert_raw(raw, used)
    return records


# ------------------------------------------------------------------------------------------- output


def _render_benchmark(report: dict[str, Any]) -> None:
    """Print the benchmark report as a table, with problems, notes and hints below it."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    splits = report["splits"]
    console.print(f"data doctor: {report['dataset']}", style="bold")
    console.print(
        f"split files under {report['split_root']}, images under {report['image_root']}", soft_wrap=True
    )
    table = Table()
    table.add_column("check")
    for name in splits:
        table.add_column(name, justify="right")
    rows = [k for k in SplitReport.__dataclass_fields__ if k not in ("split", "file", "problems", "notes")]
    for key in rows:
        table.add_row(key.replace("_", " "), *(_cell(s[key]) for s in splits.values()))
    console.print(table)
    for name, split in splits.items():
        verdict = (
            "OK" if not split["problems"] else "usable, with problems" if split["usable"] else "UNUSABLE"
        )
        console.print(f"{name} ({split['file']}): {verdict}", markup=False, highlight=False, soft_wrap=True)
        for line in split["problems"]:
            console.print(f"  problem: {line}", markup=False, highlight=False, soft_wrap=True)
        for line in split["notes"]:
            console.print(f"  note: {line}", markup=False, highlight=False, soft_wrap=True)
    for hint in report["hints"]:
        console.print(f"hint: {hint}", markup=False, highlight=False, soft_wrap=True)
    console.print("all splits usable" if report["usable"] else "some split is unusable", style="bold")


def _cell(value: Any) -> str:
    """Format a table cell (booleans as yes/NO)."""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def _render_single(report: dict[str, Any]) -> None:
    """Print the single-file report as key: value lines."""
    for key, value in report.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split the arguments into doctor options (output=, max_open=, ...) and Hydra overrides."""
    options: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in DOCTOR_OPTIONS:
            options[key] = value
        else:
            overrides.append(arg)
    if options.get("output", "table") not in ("table", "json"):
        raise UsageError(f"output must be table or json, got {options['output']!r}")
    return options, overrides


def compose_datamodule(overrides: Sequence[str]) -> Any:
    """Compose the project's config with the overrides and instantiate cfg.data."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
        return instantiate(cfg.data)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise UsageError(str(err)) from None


def run(argv: Sequence[str]) -> tuple[dict[str, Any], bool, str]:
    """Run the doctor; return (report, single-file mode?, output format)."""
    options, overrides = parse_args(argv)
    output = options.get("output", "table")
    if "split_file" in options:
        if overrides:
            raise UsageError(f"single-file mode takes no config overrides, got {overrides}")
        box_format, dataset = options.get("box_format"), options.get("dataset")
        if box_format not in (None, *BOX_FORMATS):
            raise UsageError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
        if dataset is not None and dataset not in BENCHMARKS:
            raise UsageError(f"unknown dataset {dataset!r}; known: {sorted(BENCHMARKS)}")
        return check_single_file(Path(options["split_file"]), dataset, box_format), True, output
    try:
        max_open = int(options.get("max_open", DEFAULT_MAX_OPEN))
    except ValueError:
        raise UsageError(f"max_open must be an integer, got {options['max_open']!r}") from None
    splits = [s for s in options.get("splits", "").split(",") if s]
    return check_benchmark(compose_datamodule(overrides), max_open, splits), False, output


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 = every split usable, 1 = some split unusable, 2 = bad arguments or config."""
    try:
        report, single, output = run(sys.argv[1:] if argv is None else argv)
    except (UsageError, FileNotFoundError, SplitFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if output == "json":
        print(json.dumps(report, indent=2))
    elif single:
        _render_single(report)
    else:
        _render_benchmark(report)
    return 0 if report["usable"] else 1


if __name__ == "__main__":
    sys.exit(main())
