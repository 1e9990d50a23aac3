"""The data doctor on a healthy and a broken root, the COCO-folder hint, and the single-file mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from src.data.check import main

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
UNC_VAL = SHARED / "data" / "splits" / "unc" / "unc_val.pth"
needs_unc_val = pytest.mark.skipif(
    not UNC_VAL.is_file(),
    reason=f"real split file not found at {UNC_VAL} (only in the development workspace)",
)
LONG_PHRASE = "the " + " ".join(["very"] * 20) + " tall man"


def _image(path: Path, size: tuple[int, int] = (64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 80, 40)).save(path)


def _split(root: Path, key: str, split: str, records: list[tuple]) -> None:
    folder = root / "splits" / key
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(records, folder / f"{key}_{split}.pth", _use_new_zipfile_serialization=False)


def _healthy(root: Path) -> Path:
    """A ReferIt-style root: 3 splits, every image present, every box and phrase fine."""
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        records = []
        for i in range(n):
            _image(root / "images" / f"{split}{i}.jpg")
            records.append((f"{split}{i}.jpg", f"{i}.pth", [2, 3, 40, 30], f"object number {i}", []))
        _split(root, "referit", split, records)
    return root


def _broken(root: Path) -> Path:
    """A ReferIt-style root with missing/unreadable images, bad boxes/phrases and a missing split file."""
    _healthy(root)
    (root / "images" / "train0.jpg").unlink()
    (root / "images" / "train1.jpg").write_bytes(b"not an image")
    train = [
        ("train0.jpg", "0.pth", [2, 3, 40, 30], "missing image", []),
        ("train1.jpg", "1.pth", [2, 3, 40, 30], "unreadable image", []),
        ("train2.jpg", "2.pth", [10, 10, 10, 30], "zero width", []),
        ("train3.jpg", "3.pth", [2, 3, 40, 30], "   ", []),
        ("train4.jpg", "4.pth", [2, 3, 90, 30], "past the right edge", []),
        ("train5.jpg", "5.pth", [2, 3, 40, 30], LONG_PHRASE, []),
    ]
    _split(root, "referit", "train", train)
    for i in range(3):
        (root / "images" / f"val{i}.jpg").unlink()
    (root / "splits" / "referit" / "referit_test.pth").unlink()
    return root


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def _referit_args(root: Path) -> list[str]:
    """A ReferIt config over `root` whose batch (2) fits the 6 train records, as a run needs."""
    return ["data=referit", f"data.split_root={root / 'splits'}", f"data.image_root={root / 'images'}",
            "data.batch_size=2"]


def test_healthy_root_passes(tmp_path: Path, capsys) -> None:
    code, out = _run(capsys, *_referit_args(_healthy(tmp_path)), "output=json")
    report = json.loads(out)
    assert code == 0 and report["usable"] and report["dataset"] == "referit"
    assert list(report["splits"]) == ["train", "val", "test"]
    train = report["splits"]["train"]
    assert (train["records"], train["images"], train["opened_images"]) == (6, 6, 6)
    assert train["boxes_checked_against_image"] == 6 and train["problems"] == [] and train["usable"]


def test_broken_root_is_diagnosed(tmp_path: Path, capsys) -> None:
    code, out = _run(capsys, *_referit_args(_broken(tmp_path)), "output=json")
    report = json.loads(out)
    assert code == 1 and not report["usable"]
    train, val, test = (report["splits"][s] for s in ("train", "val", "test"))
    assert not train["usable"]  # a run stops at its first missing or unreadable image
    assert (train["missing_images"], train["unreadable_images"], train["degenerate_boxes"]) == (1, 1, 1)
    assert (train["empty_phrases"], train["boxes_partly_outside_image"], train["long_phrases"]) == (1, 1, 1)
    assert (train["boxes_entirely_outside_image"], train["bad_records"]) == (0, 2)
    assert train["boxes_checked_against_image"] == 3  # the degenerate record is dropped; 2 images unreadable
    problems = "\n".join(train["problems"])
    assert "train0.jpg" in problems and "zero width" in problems and "past the right edge" in problems
    assert any(p.startswith(f"unreadable image: {train['file']}: record 0 (train0.jpg, 'missing image')")
               for p in train["problems"])
    assert "max_query_len=16" in train["notes"][0]
    assert not val["usable"] and val["missing_images"] == 3 and "no readable image" in "\n".join(val["problems"])
    assert not test["usable"] and "split file not found" in test["problems"][0]


def test_all_degenerate_boxes_make_a_split_unusable(tmp_path: Path, capsys) -> None:
    root = _healthy(tmp_path)
    _split(root, "referit", "val", [("val0.jpg", "0.pth", [5, 5, 5, 9], "flat", [])])
    code, out = _run(capsys, *_referit_args(root), "output=json", "splits=val")
    report = json.loads(out)
    assert code == 1 and list(report["splits"]) == ["val"]
    assert report["splits"]["val"]["problems"][-1].endswith(
        "referit_val.pth: split 'val': all 1 records have a zero or negative size box "
        "(data.reader.drop_degenerate=false keeps them)")


def test_table_output_and_max_open(tmp_path: Path, capsys) -> None:
    code, out = _run(capsys, *_referit_args(_broken(tmp_path)), "max_open=2")
    assert code == 1
    assert "missing images" in out and "problem: missing images: 1 of 5" in out  # the degenerate one dropped
    assert "UNUSABLE" in out and "some split is unusable" in out
    code, out = _run(capsys, *_referit_args(_healthy(tmp_path / "ok")), "max_open=2", "output=json")
    train = json.loads(out)["splits"]["train"]
    assert code == 0 and train["opened_images"] == 2
    assert train["notes"] == ["4 images not opened (max_open): a run may still fail on them"]


def test_missing_coco_images_hint_at_mappers_folder(tmp_path: Path, capsys) -> None:
    _split(
        tmp_path, "unc", "val", [("COCO_train2014_000000000001.jpg", "1.pth", [1, 2, 30, 40], "a cat", [])]
    )
    _image(tmp_path / "other" / "images" / "train2014" / "COCO_train2014_000000000001.jpg")
    args = ["data=refcoco", f"data.split_root={tmp_path / 'splits'}", f"data.data_root={tmp_path}"]
    code, out = _run(capsys, *args, "splits=val", "output=json")
    report = json.loads(out)
    assert code == 1 and report["splits"]["val"]["missing_images"] == 1
    assert any("other/images/train2014 (it exists here)" in hint for hint in report["hints"])
    fixed = [*args, f"data.image_root={tmp_path / 'other/images/train2014'}", "splits=val", "output=json"]
    assert _run(capsys, *fixed)[0] == 0


@needs_unc_val
def test_single_file_mode_on_the_real_unc_val(capsys) -> None:
    code, out = _run(capsys, f"split_file={UNC_VAL}", "dataset=unc", "output=json")
    report = json.loads(out)
    assert code == 0 and report["records"] == 10834 and report["box_format"] == "xywh"
    assert report["first"] == {
        "image": "COCO_train2014_000000000716.jpg",
        "bbox_xyxy": [407.6, 133.24, 634.27, 323.57],
        "phrase": "man on right",
    }
    code, out = _run(capsys, f"split_file={UNC_VAL}", "output=json")
    report = json.loads(out)
    assert report["box_format"] == "xywh" and report["box_format_source"] == "detected"


def test_single_file_mode_without_images_or_file(tmp_path: Path, capsys) -> None:
    _split(
        tmp_path, "referit", "val", [("9739.jpg", "9739_7.pth", [322, 303, 359, 372], "right black bag", [])]
    )
    code, out = _run(capsys, f"split_file={tmp_path / 'splits/referit/referit_val.pth'}", "dataset=referit")
    assert code == 0 and "records: 1" in out and "box_format: xyxy" in out
    code, out = _run(capsys, f"split_file={tmp_path / 'nope.pth'}", "output=json")
    assert code == 1 and "split file not found" in json.loads(out)["error"]


def test_bad_arguments_exit_2(capsys) -> None:
    assert main(["output=xml"]) == 2
    assert main(["data=no_such_benchmark"]) == 2
    assert main(["split_file=x.pth", "dataset=coco+"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_prints_json_alone_on_stdout(tmp_path: Path) -> None:
    root = _healthy(tmp_path)
    command = [sys.executable, "-m", "src.data.check", *_referit_args(root), "output=json", "splits=val"]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["splits"]["val"]["records"] == 3
