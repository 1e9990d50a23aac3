"""Readers for the three split formats (TransVG .pth, REFER refs+instances, JSON Lines) -> list[Record].

Every reader returns boxes as float (x1, y1, x2, y2) pixels of the original image. Nothing here executes
code from a data file: .pth files go through `torch.load(weights_only=True)` with an explicit allowlist,
REFER pickles through an unpickler that only builds builtin containers.
"""

from __future__ import annotations

import _codecs
import codecs
import contextlib
import io
import json
import logging
import math
import pickle
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.data.benchmarks import BOX_FORMATS
from src.data.problems import DataError
from src.data.records import Record

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

# numpy's array rebuilder, taken from an array's own pickle recipe so that it works on numpy 1.x and 2.x.
_reconstruct = np.empty(0).__reduce__()[0]

# Exactly what a Flickr30k split file (numpy float32 box arrays, pickle protocol 2) references. The files
# were written with numpy 1.x, which names the array rebuilder `numpy.core.multiarray._reconstruct`;
# numpy 2 calls it `numpy._core.multiarray._reconstruct`. Protocol 2 stores the array bytes through
# `_codecs.encode`, and unpickling the float32 dtype BUILDs an instance of numpy.dtypes.Float32DType.
SPLIT_FILE_GLOBALS: list[Any] = [
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    np.dtypes.Float32DType,
    _codecs.encode,
]

# How torch's weights-only unpickler names a refused global (a GLOBAL opcode, or a class to BUILD).
_GLOBAL_IN_ERROR = (re.compile(r"GLOBAL ([\w.]+)"), re.compile(r"but got <class '([^']+)'>"))


class SplitFileError(DataError):
    """A split file that cannot be read: unsafe, corrupt or malformed. The message names the file."""


@dataclass(frozen=True)
class RawRecord:
    """One split-file record before box conversion: image file, the box's 4 numbers as stored, phrase."""

    image: str
    box: Box
    phrase: str


@dataclass(frozen=True)
class BoxDetection:
    """The box format guessed from a split's boxes, with the evidence in words."""

    box_format: str
    reason: str


# ------------------------------------------------------------------------------------------- safe loading


def refused_global(message: str) -> str | None:
    """The refused global's name in torch's weights-only error message (None when it names none)."""
    for pattern in _GLOBAL_IN_ERROR:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return None


def safe_torch_load(path: str | Path) -> Any:
    """torch.load a split file with weights_only=True and the numpy allowlist; refuse any other global."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    try:
        with torch.serialization.safe_globals(SPLIT_FILE_GLOBALS):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        name = refused_global(str(err))
        if name is None:
            raise SplitFileError(
                f"{path}: not a readable split file ({' '.join(str(err).split())})"
            ) from None
        raise SplitFileError(
            f"{path}: refused to load: the file references the global `{name}`, which is not on the "
            "split-file allowlist (builtin containers, numpy arrays/dtypes). Split files hold only lists, "
            "strings, numbers and numpy arrays, so this is not a split file or it was tampered with; "
            "it was not unpickled any further."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise SplitFileError(f"{path}: not a readable split file ({err})") from None


class _ContainersOnlyUnpickler(pickle.Unpickler):
    """Unpickler for REFER `refs(*).p` files that builds builtin containers and nothing else."""

    ALLOWED = frozenset(
        (module, name)
        for module in ("builtins", "__builtin__")
        for name in ("dict", "list", "tuple", "set", "frozenset")
    )

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        """Decode Python 2 byte strings as UTF-8 (REFER pickles were written by Python 2)."""
        super().__init__(file, encoding="utf-8", errors="replace")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """Allow only the builtin containers; name the file and the global otherwise."""
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise SplitFileError(
            f"{self.path}: refused to load: the pickle references the global `{module}.{name}`; "
            "REFER refs files may only contain builtin containers, strings and numbers"
        )


def restricted_pickle_load(path: str | Path) -> Any:
    """Unpickle a REFER refs file with the containers-only unpickler."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"REFER refs file not found: {path}")
    with path.open("rb") as file:
        try:
            return _ContainersOnlyUnpickler(file, path).load()
        except (pickle.UnpicklingError, EOFError) as err:
            raise SplitFileError(f"{path}: not a readable pickle ({err})") from None


# ------------------------------------------------------------------------------------------------- boxes


def detect_box_format(boxes: Sequence[Box]) -> BoxDetection:
    """Guess xyxy vs xywh: xywh files always hold boxes with w < x or h < y, which are degenerate as xyxy."""
    if not boxes:
        return BoxDetection("xyxy", "no boxes to inspect; assumed xyxy")
    bad = sum(1 for x1, y1, x2, y2 in boxes if x2 <= x1 or y2 <= y1)
    if bad:
        return BoxDetection(
            "xywh", f"{bad} of {len(boxes)} boxes have x2 <= x1 or y2 <= y1 when read as xyxy"
        )
    return BoxDetection("xyxy", f"all {len(boxes)} boxes have x2 > x1 and y2 > y1 when read as xyxy")


def to_xyxy(box: Sequence[float], box_format: str, int_boxes: bool = False) -> Box:
    """Convert a stored box to float xyxy; int_boxes truncates the stored numbers first (official loader)."""
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    a, b, c, d = (float(int(v)) if int_boxes else float(v) for v in box)
    if box_format == "xywh":
        return (a, b, a + c, b + d)
    return (a, b, c, d)


def is_degenerate(box: Box) -> bool:
    """True when a box has zero or negative width or height (it cannot be a training target)."""
    return box[2] <= box[0] or box[3] <= box[1]


def _as_box(value: Any, where: str) -> Box:
    """Read 4 finite numbers from a list, tuple, numpy array or tensor, naming the record when it fails."""
    try:
        numbers = [float(v) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    except (TypeError, ValueError):
        raise SplitFileError(f"{where}: box must be 4 numbers, got {value!r}") from None
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        raise SplitFileError(f"{where}: box must be 4 finite numbers, got {value!r}")
    return (numbers[0], numbers[1], numbers[2], numbers[3])


# ---------------------------------------------------------------------------------------- TransVG splits


def _raw_record(item: Any, where: str) -> RawRecord:
    """Unpack a 5-tuple (image, id, box, phrase, attributes) or a Flickr 3-tuple (image, box, phrase)."""
    if not isinstance(item, (tuple, list)) or len(item) not in (3, 5):
        raise SplitFileError(
            f"{where}: expected a 5-tuple or a 3-tuple, got {type(item).__name__} {item!r:.80}"
        )
    image, box, phrase = (item[0], item[2], item[3]) if len(item) == 5 else item
    if not isinstance(image, str) or not isinstance(phrase, str):
        raise SplitFileError(
            f"{where}: image file and phrase must be strings, got {image!r:.60}, {phrase!r:.60}"
        )
    return RawRecord(image, _as_box(box, where), phrase)


def load_transvg_raw(path: str | Path) -> list[RawRecord]:
    """Safely load a TransVG split file and unpack its records, boxes as stored (format not applied)."""
    data = safe_torch_load(path)
    if not isinstance(data, list):
        raise SplitFileError(f"{path}: expected a list of records, got {type(data).__name__}")
    return [_raw_record(item, f"{path}: record {i}") for i, item in enumerate(data)]


def convert_raw(raw: Iterable[RawRecord], box_format: str, int_boxes: bool = False) -> list[Record]:
    """Turn raw records into Records with float xyxy boxes."""
    return [Record(r.image, to_xyxy(r.box, box_format, int_boxes), r.phrase) for r in raw]


def read_transvg(path: str | Path, box_format: str | None = None, int_boxes: bool = False) -> list[Record]:
    """Read a TransVG split file; box_format None = detect it from the boxes (and log what was detected)."""
    raw = load_transvg_raw(path)
    if box_format is None:
        detection = detect_box_format([r.box for r in raw])
        log.info("%s: detected box format %s (%s)", path, detection.box_format, detection.reason)
        box_format = detection.box_format
    return convert_raw(raw, box_format, int_boxes)


# ----------------------------------------------------------------------------------------- REFER format


def refer_split_matches(ref_split: str, split: str) -> bool:
    """Split selection of the REFER API's getRefIds: testA/B/C by letter, test = any test*, else exact.

    `trainval` (a TransVG split, not a REFER one) selects train and val.
    """
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    if split == "trainval":
        return ref_split in ("train", "val")
    return ref_split == split


def _quiet_coco(path: Path) -> Any:
    """Load instances.json with pycocotools, keeping its progress prints off stdout (JSON output)."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise FileNotFoundError(f"REFER instances file not found: {path}")
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _ref_records(ref: Any, coco: Any, where: str, int_boxes: bool) -> list[Record]:
    """One Record per sentence of a ref: COCO train2014 file name, the annotation's box, sentence['sent']."""
    try:
        box = to_xyxy(_as_box(coco.anns[ref["ann_id"]]["bbox"], where), "xywh", int_boxes)
        image = f"COCO_train2014_{int(ref['image_id']):012d}.jpg"
        return [Record(image, box, str(sentence["sent"])) for sentence in ref["sentences"]]
    except (KeyError, TypeError) as err:
        raise SplitFileError(f"{where}: missing or malformed field {err}") from None


def read_refer(
    refer_root: str | Path, dataset: str, split_by: str, split: str, int_boxes: bool = False
) -> list[Record]:
    """Read `<refer_root>/<dataset>/refs(<split_by>).p` + `instances.json`: one Record per sentence."""
    folder = Path(refer_root) / dataset
    refs_path = folder / f"refs({split_by}).p"
    refs = restricted_pickle_load(refs_path)
    if not isinstance(refs, list):
        raise SplitFileError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    coco = _quiet_coco(folder / "instances.json")
    records: list[Record] = []
    for i, ref in enumerate(refs):
        where = f"{refs_path}: ref {i}"
        if not isinstance(ref, dict) or "split" not in ref:
            raise SplitFileError(f"{where}: expected a dict with a 'split' field")
        if refer_split_matches(str(ref["split"]), split):
            records.extend(_ref_records(ref, coco, where, int_boxes))
    return records


# ----------------------------------------------------------------------------------------- JSON Lines


def _json_field(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
    """Fetch a required field of a JSONL record with a type check, naming file, line and field."""
    if name not in obj:
        raise SplitFileError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SplitFileError(f"{where}: field {name!r} must be a {kind.__name__}, got {value!r:.80}")
    return value


def _jsonl_record(obj: Any, box_format: str, int_boxes: bool, where: str) -> Record:
    """Validate one JSONL object {"image", "bbox", "phrase"} and convert its box."""
    if not isinstance(obj, dict):
        raise SplitFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    image = _json_field(obj, "image", str, where)
    bbox = _json_field(obj, "bbox", list, where)
    phrase = _json_field(obj, "phrase", str, where)
    if not image:
        raise SplitFileError(f"{where}: field 'image' is empty")
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise SplitFileError(f"{where}: field 'bbox' must be 4 numbers, got {bbox!r:.80}")
    return Record(image, to_xyxy(_as_box(bbox, f"{where}: field 'bbox'"), box_format, int_boxes), phrase)


def jsonl_header_format(obj: Any, where: str) -> str | None:
    """A line holding only {"box_format": ...} declares the file's box format; return it, else None."""
    if not isinstance(obj, dict) or set(obj) != {"box_format"}:
        return None
    if obj["box_format"] not in BOX_FORMATS:
        raise SplitFileError(
            f"{where}: field 'box_format' must be one of {BOX_FORMATS}, got {obj['box_format']!r}"
        )
    return str(obj["box_format"])


def jsonl_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(`file:line`, text) for every non-blank line, read as other tools write JSON Lines.

    A UTF-8 byte-order mark (Windows editors) is dropped; LF, CRLF and CR line ends all end a line.
    Bytes that are not UTF-8 fail naming the line, instead of a UnicodeDecodeError naming nothing.
    """
    data = path.read_bytes()
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    data = data.removeprefix(codecs.BOM_UTF8)
    for lineno, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            hint = "the file is UTF-16 (PowerShell's `>` writes it); " if utf16 else ""
            raise SplitFileError(
                f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
                f"{hint}save the file as UTF-8"
            ) from None
        if line.strip():
            yield where, line


def jsonl_declared_format(path: str | Path) -> str | None:
    """The box format a JSONL file declares on its first non-blank line, or None."""
    for where, line in jsonl_lines(Path(path)):
        try:
            return jsonl_header_format(json.loads(line), where)
        except json.JSONDecodeError:
            return None
    return None


def jsonl_objects(path: str | Path, what: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed object) for every non-blank line of a JSON Lines file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    for where, line in jsonl_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise SplitFileError(f"{where}: not valid JSON ({err.msg})") from None
        yield where, obj


def read_jsonl(path: str | Path, box_format: str | None = None, int_boxes: bool = False) -> list[Record]:
    """Read a JSON Lines split; a first line {"box_format": "xywh"} overrides the box_format setting."""
    records: list[Record] = []
    for where, obj in jsonl_objects(path, "split file"):
        declared = jsonl_header_format(obj, where) if not records else None
        if declared is not None:
            box_format = declared
            continue
        if box_format is None:
            raise SplitFileError(
                f'{where}: box format not declared; start the file with {{"box_format": "xyxy"}} '
                "or set data.reader.box_format"
            )
        records.append(_jsonl_record(obj, box_format, int_boxes, where))
    return records
