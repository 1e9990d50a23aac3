"""W&B offline: a tiny run's own run file holds the losses, learning rates, metrics, parameter report and
config, and every validation logs a table of predictions and its pictures, which the run folder holds."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wandb
from PIL import Image
from wandb.proto import wandb_internal_pb2 as pb

from src.config import compose
from src.run import run
from tests.test_default_job import TINY_JOB

BLOCK = 32768  # W&B run files use LevelDB's log layout: 32 KiB blocks of (crc, length, type) chunks


def run_records(path: Path) -> Iterator[pb.Record]:
    """The protobuf records of an offline run file (`run-<id>.wandb`)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_run_records(path: Path, timeout: float = 60.0) -> list[pb.Record]:
    """The run file's records once its `exit` record is written: W&B's service may still be writing the file
    when `wandb.finish()` has returned (seen under load: a file without any history record yet)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(run_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


@pytest.mark.slow
def test_offline_run_holds_metrics_config_and_prediction_tables(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run(compose([f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", *TINY_JOB,
                 "shuffled_text_check=false", "logger=wandb", "callbacks.wandb_predictions.max_samples=5"]))
    assert wandb.run is None  # finished: a sweep's next job in this process gets a run of its own
    [run_dir] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    history, config, pictures, captions, table_files = set(), set(), [], [], set()
    for record in finished_run_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            for item in record.history.item:
                if list(item.nested_key) == ["val/prediction_images", "filenames"]:
                    pictures += json.loads(item.value_json)
                elif list(item.nested_key) == ["val/prediction_images", "captions"]:
                    captions += json.loads(item.value_json)
        elif kind == "config":
            config |= {item.key for item in record.config.update}
        elif kind == "artifact" and record.artifact.type == "run_table":  # the table W&B shows, images and all
            table_files |= {entry.path for entry in record.artifact.manifest.contents}
    for key in ("train/loss", "train/l1", "train/giou", "lr-AdamW/head", "val/loss", "val/acc50", "val/miou",
                "test/test/acc50", "test/test/miou", "test/test/n", "val/predictions/nrows"):
        assert key in history, key
    assert {"config", "parameters"} <= config

    tables = sorted(run_dir.glob("files/media/table/val/predictions_*.table.json"))
    assert len(tables) == 2  # one per validation (2 epochs)
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["image", "phrase", "iou", "hit", "image_file"]
    assert len(table["data"]) == 5
    for _, phrase, iou, hit, image_file in table["data"]:
        assert phrase and image_file.endswith(".png") and 0.0 <= iou <= 1.0 and hit == (iou >= 0.5)
    assert {row[0] for row in table["data"]} == {"Image"}  # W&B's own table file has no pictures: hence the list
    assert sum(path.startswith("media/images/") for path in table_files) == 2 * 5

    # the canvases of both validations are in the run folder: 224 px PNGs with both boxes drawn
    assert len(pictures) == 2 * 5 and captions[-5:] == [f"{p} (IoU {iou:.2f})" for _, p, iou, *_ in table["data"]]
    for name in pictures:
        with Image.open(run_dir / "files" / name) as picture:
            assert picture.format == "PNG" and picture.size == (224, 224)
            colours = {colour for _, colour in picture.convert("RGB").getcolors(224 * 224)}
        assert {(0, 200, 0), (230, 0, 0)} <= colours, name  # ground truth green, prediction red
