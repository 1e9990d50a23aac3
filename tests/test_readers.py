"""Split readers: the real TransVG files, safe loading, the REFER format and JSON Lines."""

from __future__ import annotations

import codecs
import functools
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from src.data.benchmarks import BENCHMARKS, get_benchmark
from src.data.readers import (
    SplitFileError,
    detect_box_format,
    jsonl_declared_format,
    load_transvg_raw,
    read_jsonl,
    read_refer,
    read_transvg,
    refer_split_matches,
    restricted_pickle_load,
)
from src.data.records import Record
from tests.conftest import SHARED

SPLITS = SHARED / "data" / "splits"
needs_splits = pytest.mark.skipif(
    not SPLITS.is_dir(), reason=f"real split files not found at {SPLITS} (only in the development workspace)"
)


@functools.cache
def _real(name: str, box_format: str | None = None, int_boxes: bool = False) -> list[Record]:
    """A real split file's records, read once per test session (the weights-only unpickler is slow)."""
    return read_transvg(SPLITS / name, box_format, int_boxes)


@functools.cache
def _real_raw(name: str) -> tuple:
    """A real split file's raw records, read once per test session."""
    return tuple(load_transvg_raw(SPLITS / name))


def _save_legacy(obj: object, path: Path) -> Path:
    """Write obj the way the TransVG split files were written: legacy torch.save, pickle protocol 2."""
    torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=2)
    return path


# ----------------------------------------------------------------------------------- real split files


@needs_splits
@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("unc/unc_val.pth", 10834),
        ("unc/unc_testA.pth", 5657),
        ("unc/unc_testB.pth", 5095),
        ("referit/referit_val.pth", 5842),
    ],
)
def test_real_split_record_counts(name: str, count: int) -> None:
    key = name.split("/")[0]
    records = _real(name, BENCHMARKS[key].box_format)
    assert len(records) == count
    assert all(isinstance(r, Record) and len(r.box) == 4 for r in records)


@needs_splits
def test_coco_xywh_boxes_become_xyxy() -> None:
    first = _real("unc/unc_testA.pth", "xywh")[0]
    assert first.image == "COCO_train2014_000000000839.jpg"
    assert first.phrase == "guy flopping around on the right"
    assert first.box == pytest.approx((303.58, 69.03, 596.87, 494.82))
    val_first = _real("unc/unc_val.pth", "xywh")[0]
    assert val_first == Record(
        "COCO_train2014_000000000716.jpg", pytest.approx((407.6, 133.24, 634.27, 323.57)), "man on right"
    )


@needs_splits
def test_referit_xyxy_int_boxes_kept() -> None:
    first = _real("referit/referit_val.pth", "xyxy")[0]
    assert first == Record("9739.jpg", (322.0, 303.0, 359.0, 372.0), "right black bag")
    assert all(isinstance(v, float) for v in first.box)


@needs_splits
def test_official_int_truncation_before_conversion() -> None:
    first = _real("unc/unc_testA.pth", "xywh", True)[0]
    assert first.box == (303.0, 69.0, 303.0 + 293.0, 69.0 + 425.0)


@needs_splits
@pytest.mark.parametrize(
    ("name", "expected"), [("unc/unc_val.pth", "xywh"), ("referit/referit_val.pth", "xyxy")]
)
def test_box_format_detection_on_real_files(name: str, expected: str) -> None:
    detection = detect_box_format([r.box for r in _real_raw(name)])
    assert detection.box_format == expected
    assert detection.reason
    assert read_transvg(SPLITS / name) == _real(name, expected)


def test_detection_of_an_empty_split_assumes_xyxy() -> None:
    assert detect_box_format([]).box_format == "xyxy"


# ----------------------------------------------------------------------------------- safe loading


class _Payload:
    """A pickle payload that would run a shell command if it were unpickled without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _CustomClass:
    """Any class from a module is a forbidden global in a split file."""


def test_forbidden_global_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _save_legacy([("a.jpg", "1.pth", [0, 0, 1, 1], "x", []), _Payload(marker)], tmp_path / "evil.pth")
    with pytest.raises(SplitFileError) as err:
        read_transvg(path, "xyxy")
    message = str(err.value)
    assert str(path) in message
    assert f"{os.system.__module__}.system" in message  # posix.system
    assert not marker.exists()


def test_custom_class_global_is_refused(tmp_path: Path) -> None:
    path = _save_legacy([_CustomClass()], tmp_path / "custom.pth")
    with pytest.raises(SplitFileError, match=r"_CustomClass"):
        load_transvg_raw(path)


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_flickr_numpy_float32_split_loads(tmp_path: Path, numpy_module: str) -> None:
    records = [
        ("1000092795.jpg", np.array([10.5, 20, 110, 220], dtype=np.float32), "two young guys"),
        ("1000092795.jpg", np.array([0, 1, 2, 3], dtype=np.float32), "shrubbery"),
    ]
    path = _save_legacy(records, tmp_path / "flickr_val.pth")
    # The real files come from numpy 1.x, whose pickles name numpy.core.multiarray._reconstruct.
    data = path.read_bytes()
    native = np.empty(0).__reduce__()[0].__module__.encode()
    path.write_bytes(data.replace(native + b"\n_reconstruct", numpy_module.encode() + b"\n_reconstruct"))
    assert numpy_module.encode() in path.read_bytes()
    loaded = read_transvg(path, get_benchmark("flickr").box_format)
    assert loaded == [
        Record("1000092795.jpg", (10.5, 20.0, 110.0, 220.0), "two young guys"),
        Record("1000092795.jpg", (0.0, 1.0, 2.0, 3.0), "shrubbery"),
    ]


def test_numpy_globals_beyond_flickrs_are_refused(tmp_path: Path) -> None:
    path = _save_legacy([("a.jpg", np.array([0, 1, 2, 3], dtype=np.float64), "x")], tmp_path / "f64.pth")
    with pytest.raises(SplitFileError, match=r"f64\.pth: refused to load.*Float64DType"):
        read_transvg(path, "xyxy")


def test_empty_split_file_reads_as_no_records(tmp_path: Path) -> None:
    assert read_transvg(_save_legacy([], tmp_path / "unc_trainval.pth"), "xywh") == []


def test_malformed_record_names_file_and_record(tmp_path: Path) -> None:
    path = _save_legacy(
        [("a.jpg", "1", [0, 0, 5, 5], "ok", []), ("b.jpg", [1, 2, 3], "short box", 0)], tmp_path / "x.pth"
    )
    with pytest.raises(SplitFileError, match=r"x\.pth: record 1"):
        read_transvg(path, "xyxy")


def test_missing_split_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_transvg(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------------- REFER format


def _build_refer_root(root: Path, splits: dict[str, list[tuple]]) -> None:
    """Write refcoco/refs(unc).p + instances.json holding TransVG 5-tuples, one ref per annotation."""
    refs, annotations, images = [], {}, {}
    sent_id = 0
    for split, records in splits.items():
        for image_file, mask_file, bbox, phrase, _ in records:
            ann_id = int(Path(mask_file).stem)
            image_id = int(Path(image_file).stem.split("_")[-1])
            if not refs or refs[-1]["ann_id"] != ann_id:
                refs.append(
                    {
                        "ref_id": len(refs),
                        "ann_id": ann_id,
                        "image_id": image_id,
                        "category_id": 1,
                        "split": split,
                        "sent_ids": [],
                        "sentences": [],
                        "file_name": "ignored.jpg",
                    }
                )
                annotations[ann_id] = {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": list(bbox),
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                    "segmentation": [],
                }
                images[image_id] = {"id": image_id, "file_name": image_file, "height": 480, "width": 640}
            sentence = {"sent_id": sent_id, "sent": phrase, "raw": phrase, "tokens": phrase.split()}
            refs[-1]["sentences"].append(sentence)
            refs[-1]["sent_ids"].append(sent_id)
            sent_id += 1
    folder = root / "refcoco"
    folder.mkdir(parents=True)
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {
        "images": list(images.values()),
        "annotations": list(annotations.values()),
        "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}],
    }
    (folder / "instances.json").write_text(json.dumps(instances))


@needs_splits
def test_refer_format_gives_the_split_file_records(tmp_path: Path) -> None:
    raw = {
        split: torch.load(SPLITS / f"unc/unc_{split}.pth", weights_only=True) for split in ("val", "testA")
    }
    _build_refer_root(tmp_path, raw)
    for split in ("val", "testA"):
        expected = _real(f"unc/unc_{split}.pth", "xywh")
        assert read_refer(tmp_path, "refcoco", "unc", split) == expected
        expected_int = _real(f"unc/unc_{split}.pth", "xywh", True)
        assert read_refer(tmp_path, "refcoco", "unc", split, int_boxes=True) == expected_int
    assert len(read_refer(tmp_path, "refcoco", "unc", "test")) == 5657  # "test" = every test* split
    assert read_refer(tmp_path, "refcoco", "unc", "testB") == []


def test_refer_split_matching_follows_the_refer_api() -> None:
    assert refer_split_matches("testA", "testA") and not refer_split_matches("testB", "testA")
    assert refer_split_matches("testA", "test") and refer_split_matches("testB", "test")
    assert refer_split_matches("train", "train") and not refer_split_matches("train", "val")
    assert refer_split_matches("val", "trainval") and refer_split_matches("train", "trainval")


def test_refer_pickle_with_a_forbidden_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"split": "val"}, _Payload(marker)], protocol=2))
    with pytest.raises(SplitFileError, match=r"refs\(unc\)\.p.*system"):
        restricted_pickle_load(path)
    assert not marker.exists()


def test_refer_pickle_of_python2_containers_loads(tmp_path: Path) -> None:
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([{"split": "val", "sent_ids": {1, 2}, "box": (1.5, 2)}], protocol=2))
    assert restricted_pickle_load(path) == [{"split": "val", "sent_ids": {1, 2}, "box": (1.5, 2)}]


# ----------------------------------------------------------------------------------- JSON Lines


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_xyxy_and_xywh(tmp_path: Path) -> None:
    rows = [
        {"image": "a.jpg", "bbox": [10, 20, 30, 60], "phrase": "red car"},
        "",
        {"image": "sub/b.png", "bbox": [1.5, 2.5, 3, 4], "phrase": "the dog", "id": 7},
    ]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    assert read_jsonl(path, "xyxy") == [
        Record("a.jpg", (10.0, 20.0, 30.0, 60.0), "red car"),
        Record("sub/b.png", (1.5, 2.5, 3.0, 4.0), "the dog"),
    ]
    assert read_jsonl(path, "xywh") == [
        Record("a.jpg", (10.0, 20.0, 40.0, 80.0), "red car"),
        Record("sub/b.png", (1.5, 2.5, 4.5, 6.5), "the dog"),
    ]


def test_jsonl_header_declares_the_file_box_format(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "val.jsonl",
        [{"box_format": "xywh"}, {"image": "a.jpg", "bbox": [1, 2, 3, 4], "phrase": "x"}],
    )
    assert read_jsonl(path, "xyxy") == [Record("a.jpg", (1.0, 2.0, 4.0, 6.0), "x")]
    assert read_jsonl(path) == [Record("a.jpg", (1.0, 2.0, 4.0, 6.0), "x")]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"bad\.jsonl:2: not valid JSON"),
        ({"bbox": [1, 2, 3, 4], "phrase": "x"}, r"bad\.jsonl:2: missing field 'image'"),
        (
            {"image": "a.jpg", "bbox": [1, 2, 3], "phrase": "x"},
            r"bad\.jsonl:2: field 'bbox' must be 4 numbers",
        ),
        (
            {"image": "a.jpg", "bbox": [1, 2, "3", 4], "phrase": "x"},
            r"bad\.jsonl:2: field 'bbox' must be 4 numbers",
        ),
        (
            {"image": "a.jpg", "bbox": [1, 2, 3, 4], "phrase": 5},
            r"bad\.jsonl:2: field 'phrase' must be a str",
        ),
        ({"image": "", "bbox": [1, 2, 3, 4], "phrase": "x"}, r"bad\.jsonl:2: field 'image' is empty"),
        ([1, 2], r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path: Path, line: object, match: str) -> None:
    path = _write_jsonl(
        tmp_path / "bad.jsonl", [{"image": "ok.jpg", "bbox": [0, 0, 1, 1], "phrase": "fine"}, line]
    )
    with pytest.raises(SplitFileError, match=match):
        read_jsonl(path, "xyxy")


HEADER = b'{"box_format": "xywh"}'
XYWH_ROW = '{"image": "a.jpg", "bbox": [1, 2, 3, 4], "phrase": "café"}'.encode()
XYXY_ROW = XYWH_ROW.replace(b"3, 4", b"4, 6")
WINDOWS_JSONL = [  # (name, file bytes): what editors and scripts on other systems write
    ("utf-8 byte-order mark", codecs.BOM_UTF8 + HEADER + b"\n" + XYWH_ROW + b"\n"),
    ("byte-order mark on a record", codecs.BOM_UTF8 + XYXY_ROW),
    ("CRLF, blank lines, extra fields",
     b"\r\n" + HEADER + b"\r\n\r\n" + XYWH_ROW[:-1] + b', "id": 7, "source": "me"}\r\n\r\n'),
    ("CR line ends", HEADER + b"\r" + XYWH_ROW + b"\r"),
]


@pytest.mark.parametrize("content", [c for _, c in WINDOWS_JSONL], ids=[n for n, _ in WINDOWS_JSONL])
def test_jsonl_as_other_tools_write_it_is_accepted(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "val.jsonl"
    path.write_bytes(content)
    assert read_jsonl(path, "xyxy") == [Record("a.jpg", (1.0, 2.0, 4.0, 6.0), "café")]
    assert jsonl_declared_format(path) == ("xywh" if b"box_format" in content else None)


def test_jsonl_line_separator_inside_a_phrase_is_not_a_line_end(tmp_path: Path) -> None:
    row = {"image": "a.jpg", "bbox": [1, 2, 4, 6], "phrase": "left\u2028right\x85"}
    (tmp_path / "val.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_jsonl(tmp_path / "val.jsonl", "xyxy") == [Record("a.jpg", (1.0, 2.0, 4.0, 6.0), "left\u2028right\x85")]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"image": "a.jpg", "bbox": [1, 2, 4, 6], "phrase": "ok"}\n\n{"image": "b.jpg", "bbox": [1, 2, 4, 6], '
         b'"phrase": "caf\xe9"}\n', r"x\.jsonl:3: not UTF-8 text \(byte 0xe9 at byte 56 of the line\); save the file"),
        ('{"image": "a.jpg", "bbox": [1, 2, 4, 6], "phrase": "ok"}\r\n'.encode("utf-16"),
         r"x\.jsonl:1: not UTF-8 text \(byte 0xff at byte 1 of the line\); the file is UTF-16"),
    ],
    ids=["latin-1 byte", "utf-16"],
)
def test_jsonl_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "x.jsonl").write_bytes(content)
    with pytest.raises(SplitFileError, match=match):
        read_jsonl(tmp_path / "x.jsonl", "xyxy")


def test_jsonl_without_a_declared_box_format_is_refused(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "x.jsonl", [{"image": "a.jpg", "bbox": [1, 2, 3, 4], "phrase": "x"}])
    with pytest.raises(SplitFileError, match=r"x\.jsonl:1: box format not declared"):
        read_jsonl(path)


def test_benchmark_registry() -> None:
    assert get_benchmark("unc").splits == ("train", "val", "testA", "testB", "trainval")
    assert get_benchmark("gref").splits == ("train", "val")
    assert get_benchmark("flickr").record_shape == "3-tuple"
    assert get_benchmark("unc+").split_file("data", "val") == Path("data/unc+/unc+_val.pth")
    assert get_benchmark("custom").split_file("d", "train") == Path("d/train.jsonl")
    with pytest.raises(ValueError, match="unknown benchmark"):
        get_benchmark("coco+")
    with pytest.raises(ValueError, match="no split 'test'"):
        get_benchmark("gref").check_split("test")
