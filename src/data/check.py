"""The data doctor: checks a benchmark's splits, images, boxes and phrases before you train on them.

    python -m src.data.check data=<benchmark> [data.<key>=<value> ...] [output=json] [max_open=N] [splits=a,b]
    python -m src.data.check split_file=PATH [dataset=<key>] [box_format=xyxy|xywh] [output=json]

The first form composes the project's Hydra config (so `data=` and overrides work exactly as in a run)
and reports per split: records, distinct images, missing/unreadable images, degenerate boxes, boxes
partly and entirely outside their image, empty phrases and phrases longer than the query length. It
judges a split with the run's own code (the datamodule's reading, its train-batch check, the dataset's
image decoding and box check), so a split it calls usable is one a run reads without failing, and a
split a run would stop on is unusable with the run's own message. The second form reads one split file
and reports its record count, box format (declared or detected) and first record, even when no images
are present. Exit status: 0 = every split usable, 1 = some split unusable, 2 = bad arguments.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from src.data.benchmarks import BENCHMARKS, BOX_FORMATS, COCO_IMAGES, MAPPER_COCO_IMAGES, get_benchmark
from src.data.dataset import RecordDataset
from src.data.problems import BadRecordError, DataError
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
from src.progress import Progress

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DOCTOR_OPTIONS = ("output", "max_open", "splits", "split_file", "dataset", "box_format")
DEFAULT_MAX_OPEN = -1  # every image: a run fails on any unreadable one, so the verdict needs them all
DECODE_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes without holding the GIL
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
    boxes_partly_outside_image: int = 0
    boxes_entirely_outside_image: int = 0
    boxes_checked_against_image: int = 0
    bad_records: int = 0
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
    """A split's distinct images: missing, unreadable, sizes of those decoded, and not opened (max_open).

    `errors` holds, per missing or unreadable image, the run's error for the first record using it.
    """

    missing: list[str]
    unreadable: list[str]
    sizes: dict[str, tuple[int, int]]
    errors: dict[str, BadRecordError]
    not_opened: int


# ------------------------------------------------------------------------------------------- checks


def _decode(dataset: RecordDataset, index: int) -> tuple[int, int] | BadRecordError:
    """The size of a record's image read as the run reads it (decoded in full), or the run's error."""
    try:
        return dataset.read_image(index).size
    except BadRecordError as err:
        return err


def check_images(dataset: RecordDataset, max_open: int, what: str = "images") -> ImageCheck:
    """Read each distinct image once, as the run does: the missing ones and the first max_open present ones
    (negative = all), in DECODE_THREADS threads; a progress line on stderr about every 10 s, named `what`."""
    first_use: dict[str, int] = {}
    for i, record in enumerate(dataset.records):
        first_use.setdefault(record.image, i)
    missing = [name for name in first_use if not (dataset.image_root / name).is_file()]
    missing_set = set(missing)
    present = [name for name in first_use if name not in missing_set]
    to_open = present if max_open < 0 else present[:max_open]
    names = to_open + missing
    progress = Progress(what, len(names), lambda line: print(line, file=sys.stderr, flush=True), unit="images")
    found: dict[str, tuple[int, int] | BadRecordError] = {}
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        for name, result in zip(names, pool.map(lambda name: _decode(dataset, first_use[name]), names), strict=True):
            found[name] = result
            progress.update(len(found))
    sizes = {name: size for name, size in found.items() if not isinstance(size, BadRecordError)}
    errors = {name: err for name, err in found.items() if isinstance(err, BadRecordError)}
    unreadable = [name for name in to_open if name in errors]
    return ImageCheck(missing, unreadable, sizes, errors, len(present) - len(to_open))


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


def check_read_records(report: SplitReport, records: Sequence[Record]) -> None:
    """Checks of the records as read: degenerate boxes (dropped by the run by default), empty phrases."""
    degenerate = [i for i, r in enumerate(records) if is_degenerate(r.box)]
    empty = [i for i, r in enumerate(records) if not r.phrase.strip()]
    report.degenerate_boxes, report.empty_phrases = len(degenerate), len(empty)
    _count_problem(report, records, degenerate, "degenerate boxes (zero or negative width/height)")
    _count_problem(report, records, empty, "empty phrases")


def check_boxes(report: SplitReport, read: Sequence[Record], dataset: RecordDataset, images: ImageCheck) -> None:
    """Boxes against their decoded image with the run's own check: entirely outside (a bad record) apart from
    partly outside (clipped in clean mode, kept in official mode); then the bad records under the policy.

    `read` are the split's records as read; examples name a record by its place there, as the run does.
    """
    records = dataset.records
    sized = [i for i, r in enumerate(records) if r.image in images.sizes]
    failures: dict[int, str] = {}
    for i in sized:
        try:
            dataset.checked_box(i, images.sizes[records[i].image])
        except BadRecordError as err:
            failures[i] = str(err)
    entirely = sorted(failures)
    partly = [i for i in sized if i not in failures and outside_image(records[i].box, images.sizes[records[i].image])]
    report.boxes_checked_against_image = len(sized)
    report.boxes_entirely_outside_image, report.boxes_partly_outside_image = len(entirely), len(partly)
    _count_problem(report, read, [dataset.positions[i] for i in entirely], "boxes entirely outside their image")
    _count_problem(
        report,
        read,
        [dataset.positions[i] for i in partly],
        "boxes partly outside their image (clipped in clean mode, kept in official mode)",
    )
    bad_images = [i for i, r in enumerate(records) if r.image in images.errors]
    if bad_images:  # the first record of an unreadable image: the one its error was made for
        failures[bad_images[0]] = str(images.errors[records[bad_images[0]].image])
    report.bad_records = len(entirely) + len(bad_images)
    if not failures:
        return
    first = failures[min(failures)]
    if dataset.bad_records == "fail":
        report.unusable(first)
    else:
        report.problems.append(f"records a run skips (data.bad_records=skip): {report.bad_records}, e.g. {first}")


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
    if images.not_opened:
        report.notes.append(
            f"{images.not_opened} images not opened (max_open): a run may still fail on them"
        )
    if report.images and len(images.missing) + len(images.unreadable) == report.images:
        report.unusable(f"no readable image under {image_root}")


def check_split(dm: Any, split: str, max_open: int, bert: Any) -> SplitReport:
    """All checks of one split of a configured datamodule, judged by the run's own code."""
    report = SplitReport(split, str(dm.split_file(split)))
    try:
        records = dm.read_split(split)
    except (FileNotFoundError, SplitFileError) as err:
        report.unusable(str(err))
        return report
    report.records = len(records)
    check_read_records(report, records)
    check_phrase_lengths(report, records, bert, dm.max_query_len)
    try:
        usable = dm.adopt_records(split, records)
    except DataError as err:
        report.unusable(str(err))
        return report
    train = split == dm.train_split
    if train:
        try:
            dm.check_one_batch(len(usable))
        except DataError as err:
            report.unusable(str(err))
    dataset = dm.record_dataset(split, train)
    report.images = len({r.image for r in usable})
    images = check_images(dataset, max_open, f"data doctor: {split}")
    check_image_report(report, dm.image_root, images)
    check_boxes(report, records, dataset, images)
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
    dm.prepare_data()
    wanted = list(splits) if splits else list(dict.fromkeys([dm.train_split, dm.val_split, *dm.test_splits]))
    bert = dm.tokenizers()[0]
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
