"""The README's hard-input table, row by row: what each input gets at training, evaluation and predict time.

Rows already covered elsewhere: wrong tuple shape (test_readers::test_malformed_record_names_file_and_record),
a pickle that would run code in a split file (test_readers::test_forbidden_global_is_refused_and_never_executed,
test_refer_pickle_with_a_forbidden_global_is_refused), a checkpoint of another config
(test_checkpoints::test_checkpoint_of_another_method_is_refused_with_the_keys_listed).
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from src import predict
from src.config import compose
from src.data import check
from src.data.datamodule import GroundingDataModule
from src.data.dataset import RecordDataset, collate
from src.data.images import ImageReadError, load_image
from src.data.problems import BadRecordError, DataError, SkippedRecords
from src.data.readers import SplitFileError
from src.data.records import Record
from src.data.tokenizers import bert_tokenizer, clip_tokenizer
from src.data.transforms import EvalTransform
from src.run import build_seeded_module, run
from src.storage.checkpoints import read_checkpoint
from tests.test_checkpoints import save
from tests.test_datamodule import make_dm, make_referit_root
from tests.test_default_job import TINY_JOB

RED = (220, 20, 20)


def dataset(root: Path, records: list[Record], **kwargs) -> RecordDataset:
    """A RecordDataset with the eval transform at 64 px and the bundled tokenizers."""
    return RecordDataset(records, root, EvalTransform(64), bert_tokenizer(None), clip_tokenizer(None), 8,
                         source="split.pth", **kwargs)


def truncated_jpeg(path: Path) -> Path:
    data = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(data, "JPEG")
    path.write_bytes(data.getvalue()[:300])
    return path


# ------------------------------------------------------------------------------- unreadable images


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated"])
def test_unreadable_image_fails_naming_split_file_record_and_image(tmp_path: Path, kind: str) -> None:
    if kind == "corrupt":
        (tmp_path / "a.jpg").write_bytes(b"not a jpeg at all")
    elif kind == "truncated":
        truncated_jpeg(tmp_path / "a.jpg")
    data = dataset(tmp_path, [Record("a.jpg", (1, 1, 9, 9), "the cat")])
    with pytest.raises(BadRecordError, match=r"^unreadable image: split\.pth: record 0 \(a\.jpg, 'the cat'\).*a\.jpg"):
        data[0]


def test_unreadable_image_is_skipped_and_counted_under_skip(tmp_path: Path, caplog) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "ok.png")
    truncated_jpeg(tmp_path / "bad.jpg")
    records = [Record("ok.png", (1, 1, 9, 9), "a"), Record("bad.jpg", (1, 1, 9, 9), "b"),
               Record("gone.png", (1, 1, 9, 9), "c")]
    data = dataset(tmp_path, records, bad_records="skip")
    batch = collate([data[i] for i in range(3)])
    assert batch["image"].shape[0] == 1 and batch["index"].tolist() == [0] and batch["phrase"] == ["a"]
    assert [(i, kind) for i, kind, _ in batch["skipped"]] == [(1, "unreadable image"), (2, "unreadable image")]
    only_bad = collate([data[1], data[2]])
    assert "image" not in only_bad and only_bad["phrase"] == [] and len(only_bad["skipped"]) == 2

    skipped = SkippedRecords()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # three epochs over the same bad records: counted once each
            skipped.note("train", batch["skipped"] + only_bad["skipped"])
    summary = skipped.summary()["train"]
    assert summary["count"] == 2 and summary["kinds"] == {"unreadable image": 2}
    assert "bad.jpg" in summary["examples"][0] and "gone.png" in summary["examples"][1]
    assert sum("skipped a record" in r.message for r in caplog.records) == 2


def test_bad_records_policy_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad_records must be one of"):
        dataset(tmp_path, [], bad_records="ignore")


def test_decompression_bomb_is_an_unreadable_image(tmp_path: Path, monkeypatch) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100 x 100 is then > 2x the limit: refused by PIL
    with pytest.raises(ImageReadError, match="big.png"):
        load_image(tmp_path / "big.png", "record 0")


# ------------------------------------------------------------------------------- image modes and sizes


def mode_image(mode: str) -> Image.Image:
    """A 40 x 30 image whose left half is dark and right half bright, in `mode`."""
    if mode in ("I;16", "I"):
        values = np.full((30, 40), 3000, np.uint16 if mode == "I;16" else np.int32)  # 3000 / 65535: dark
        values[:, 20:] = 60000
        return Image.fromarray(values) if mode == "I;16" else Image.fromarray(values, mode="I")
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:, 20:] = 230
    image = Image.fromarray(rgb)
    if mode == "P":
        return image.convert("P")
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(128)
        return image
    return image.convert(mode)


@pytest.mark.parametrize("mode,suffix", [("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg"),
                                         ("I;16", "png"), ("I", "tif"), ("RGB", "png")])
def test_every_image_mode_becomes_8bit_rgb_with_its_contrast(tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"image.{suffix}"
    mode_image(mode).save(path)
    image = load_image(path, "record 0")
    assert image.mode == "RGB" and image.size == (40, 30)
    pixels = np.asarray(image).astype(int)
    dark, bright = pixels[:, :20].mean(), pixels[:, 20:].mean()
    assert dark < 30 and bright > 200, (mode, dark, bright)  # 16-bit: scaled, not clipped to white


def exif_rotated(path: Path) -> Path:
    """A 60 x 20 stored image (red block at its left end) tagged EXIF orientation 6 (shown rotated 90 cw)."""
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste(RED, (0, 0, 10, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied_only_when_asked(tmp_path: Path) -> None:
    path = exif_rotated(tmp_path / "phone.jpg")
    stored = load_image(path, "x")
    upright = load_image(path, "x", exif_transpose=True)
    assert stored.size == (60, 20) and upright.size == (20, 60)
    assert np.asarray(upright)[:10, :, 0].mean() > 150  # the red block is now at the top
    records = [Record("phone.jpg", (0, 0, 10, 20), "the red block")]
    as_stored, turned = dataset(tmp_path, records)[0], dataset(tmp_path, records, exif_transpose=True)[0]
    assert not torch.equal(as_stored["image"], turned["image"])
    # with exif_transpose the same box is read in upright pixels: (0, 0, 10, 20) is the top-left corner
    # of a 20 x 60 image, which is entirely inside it
    assert turned["box"].tolist() == pytest.approx(EvalTransform(64)(upright, (0, 0, 10, 20), "x").box.tolist())


@pytest.mark.parametrize("size,box", [((1, 1), (0, 0, 1, 1)), ((10000, 40), (5000, 0, 10000, 40)),
                                      ((40, 10000), (0, 0, 40, 100))])
def test_tiny_and_huge_images_work(tmp_path: Path, size: tuple[int, int], box: tuple) -> None:
    Image.new("RGB", size, (10, 200, 10)).save(tmp_path / "x.png")
    sample = dataset(tmp_path, [Record("x.png", box, "it")])[0]
    assert sample["image"].shape == (3, 64, 64) and torch.isfinite(sample["box"]).all()
    assert (sample["box"][2:] > 0).all()


# ------------------------------------------------------------------------------- boxes


def test_box_partly_outside_is_clipped_in_clean_mode_and_kept_in_official(tmp_path: Path) -> None:
    Image.new("RGB", (40, 20)).save(tmp_path / "x.png")  # placed as 64 x 32 at y = 16 on the 64 px canvas
    records = [Record("x.png", (-10, 10, 30, 40), "it")]
    clipped = dataset(tmp_path, records)[0]["box"]  # (0, 10, 30, 20) -> canvas (0, 32, 48, 48), cxcywh / 64
    assert clipped.tolist() == pytest.approx([24 / 64, 40 / 64, 48 / 64, 16 / 64])
    as_stored = dataset(tmp_path, records, clip_boxes=False)[0]["box"]  # only the canvas bounds it
    assert as_stored.tolist() == pytest.approx([24 / 64, 48 / 64, 48 / 64, 32 / 64])


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_box_entirely_outside_its_image_is_a_bad_record(tmp_path: Path, policy: str) -> None:
    Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
    data = dataset(tmp_path, [Record("x.png", (100, 100, 200, 200), "it")], bad_records=policy)
    if policy == "fail":
        with pytest.raises(BadRecordError, match=r"box outside the image: split\.pth: record 0.*40x30 image"):
            data[0]
    else:
        assert data[0]["skipped"][1] == "box outside the image"


def test_degenerate_and_negative_boxes_are_dropped_at_reading_and_counted(tmp_path: Path, caplog) -> None:
    extra = {"val": [("val_0.jpg", "x", [10, 10, 10, 30], "zero width", []),
                     ("val_1.jpg", "x", [30, 10, 5, 20], "negative width", [])]}
    root = make_referit_root(tmp_path, {"train": 2, "val": 3, "test": 1}, extra=extra)
    dm = make_dm(root)
    with caplog.at_level(logging.WARNING):
        assert len(dm.usable_records("val")) == 3
    assert dm.reading_problems() == {"val": {"degenerate box": 2}}
    assert "dropped 2 of 5 records" in caplog.text
    kept = make_dm(root, reader={"drop_degenerate": False})  # kept as stored, as the official loader does
    assert len(kept.usable_records("val")) == 5 and kept.reading_problems() == {}


# ------------------------------------------------------------------------------- phrases


def test_empty_and_whitespace_phrases_leave_only_the_special_tokens(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    for phrase in ("", "   \t"):
        sample = dataset(tmp_path, [Record("x.png", (1, 1, 9, 9), phrase)])[0]
        assert sample["text_ids"][:2].tolist() == [101, 102] and sample["text_mask"].sum() == 2
        assert sample["prior_ids"][:2].tolist() == [49406, 49407] and sample["prior_mask"].sum() == 2


def test_long_phrase_is_truncated_to_the_query_length_ending_in_sep() -> None:
    ids, mask = bert_tokenizer(None)(["the man " * 40], 8)
    assert ids.shape == (1, 8) and mask.sum() == 8 and ids[0, 0] == 101 and ids[0, -1] == 102
    prior, prior_mask = clip_tokenizer(None)(["the man " * 40], 8)
    assert prior_mask.sum() == 8 and prior[0, -1] == 49407


def test_non_ascii_text() -> None:
    bert, clip = bert_tokenizer(None), clip_tokenizer(None)
    assert torch.equal(bert(["Café naïve"], 8)[0], bert(["cafe naive"], 8)[0])  # uncased BERT strips accents
    cjk, cjk_mask = bert(["左边的男人"], 8)
    assert cjk_mask.sum() == 7 and (cjk == 100).sum() >= 1  # a token per CJK character, [UNK] outside the vocab
    assert bert(["the 🐶"], 8)[0][0, :4].tolist() == [101, 1996, 100, 102]  # emoji: [UNK]
    ids, _ = clip(["the 🐶 左边 café"], 20)  # byte-level BPE: no unknown token
    assert ((ids > 0) & (ids < 49406)).sum() >= 4


# ------------------------------------------------------------------------------- splits


def test_empty_split_files_fail_naming_the_file(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path / "pth", {"train": 2, "val": 0, "test": 1})
    with pytest.raises(SplitFileError, match=r"referit_val\.pth: split 'val' has no records"):
        make_dm(root).setup("validate")
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "val.jsonl").write_text("\n")
    dm = GroundingDataModule(dataset="custom", split_root=str(tmp_path / "jsonl"), image_root=str(tmp_path),
                             val_split="val", reader={"box_format": "xyxy"}, bert_vocab=None)
    with pytest.raises(SplitFileError, match=r"val\.jsonl: split 'val' has no records"):
        dm.usable_records("val")


def test_all_degenerate_split_fails_naming_the_file(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path, {"train": 2, "val": 0, "test": 1},
                             extra={"val": [("v.jpg", "x", [5, 5, 5, 5], "a point", [])]})
    with pytest.raises(SplitFileError, match=r"referit_val\.pth: split 'val': all 1 records have a zero"):
        make_dm(root).usable_records("val")


def test_train_split_smaller_than_one_batch_fails_instead_of_training_nothing(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path, {"train": 3, "val": 2, "test": 1})
    dm = make_dm(root, batch_size=4)
    with pytest.raises(DataError, match=r"referit_train\.pth: the train split has 3 usable records.*one batch of 4"):
        dm.train_dataloader()
    assert len(make_dm(root, batch_size=4, drop_last=False).train_dataloader()) == 1
    assert len(make_dm(root, batch_size=3).train_dataloader()) == 1


# ------------------------------------------------------------------------------- the data doctor agrees with the run

TRAIN_ROWS = [{"image": f"train{i}.jpg", "bbox": [4, 4, 40, 30], "phrase": p}
              for i, p in enumerate(["the red wall", "the café sign", "a door", "the roof"])]


def write_split(root: Path, split: str, rows: list[dict], bom: bool = False, newline: str = "\n",
                encoding: str = "utf-8") -> None:
    """A JSONL split file of `rows`, written as another tool might: byte-order mark, line ends, encoding."""
    text = newline.join(json.dumps(row, ensure_ascii=False) for row in rows) + newline
    (root / "splits" / f"{split}.jsonl").write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode(encoding))


def custom_benchmark(root: Path) -> Path:
    """A healthy `data=custom` benchmark: train (4 records), val and test (2 each), 64 x 48 JPEGs."""
    (root / "splits").mkdir(parents=True)
    (root / "images").mkdir()
    for split, rows in (("train", TRAIN_ROWS), ("val", TRAIN_ROWS[:2]), ("test", TRAIN_ROWS[2:])):
        rows = [row | {"image": row["image"].replace("train", split)} for row in rows]
        for row in rows:
            Image.new("RGB", (64, 48), (30, 120, 200)).save(root / "images" / row["image"])
        write_split(root, split, rows)
    return root


def train_box(box: list[float]) -> list[dict]:
    """The train rows with record 1's box replaced."""
    return [row | {"bbox": box} if i == 1 else row for i, row in enumerate(TRAIN_ROWS)]


RECORD_1 = r"^{}: .*train\.jsonl: record 1 \(train1\.jpg, 'the café sign'\): "
IMAGE_1 = RECORD_1.format("unreadable image") + r"cannot read image .*train1\.jpg: "

# (case, what it does to the healthy benchmark, extra overrides, the run's message: None = it runs)
HARD_INPUTS = [
    ("good data", lambda root: None, [], None),
    ("truncated JPEG", lambda root: truncated_jpeg(root / "images/train1.jpg"), [],
     IMAGE_1 + "Truncated File Read"),
    ("zero-byte image", lambda root: (root / "images/train1.jpg").write_bytes(b""), [],
     IMAGE_1 + "cannot identify image file"),
    ("missing image", lambda root: (root / "images/train1.jpg").unlink(), [], IMAGE_1 + r"\[Errno 2\] No such file"),
    ("unreadable image under bad_records=skip", lambda root: truncated_jpeg(root / "images/train1.jpg"),
     ["data.bad_records=skip"], None),
    ("box entirely outside", lambda root: write_split(root, "train", train_box([100, 60, 120, 90])), [],
     RECORD_1.format("box outside the image") + r"box \(100\.0, 60\.0, 120\.0, 90\.0\) lies outside the 64x48 image"),
    # messages number a record by its place in the split file, also when an earlier record was dropped (a
    # fifth record keeps the 4 usable ones a multiple of the batch: with drop_last, an epoch leaves out the
    # remainder, and a bad record there would only be met in a later epoch)
    ("box entirely outside, after a degenerate box",
     lambda root: write_split(root, "train", [TRAIN_ROWS[0] | {"bbox": [20, 4, 20, 30]},
                                              *train_box([100, 60, 120, 90])[1:], TRAIN_ROWS[0]]),
     [], RECORD_1.format("box outside the image")),
    ("box partly outside (clipped)", lambda root: write_split(root, "train", train_box([-10, 4, 90, 30])), [], None),
    ("box partly outside, official mode (kept)", lambda root: write_split(root, "train", train_box([-10, 4, 90, 30])),
     ["data.mode=official"], None),
    ("degenerate box (dropped)", lambda root: write_split(root, "train", train_box([20, 4, 20, 30])), [], None),
    ("train split of one record, smaller than the batch", lambda root: write_split(root, "train", TRAIN_ROWS[:1]), [],
     r"train\.jsonl: the train split has 1 usable records, 1 per process over 1, fewer than one batch of 2 with "
     r"data\.drop_last=true"),
    ("empty val split", lambda root: write_split(root, "val", []), [], r"val\.jsonl: split 'val' has no records$"),
    ("JSONL with a byte-order mark", lambda root: write_split(root, "train", TRAIN_ROWS, bom=True), [], None),
    # CRLF line ends with a blank line after every record, and a field the reader does not know
    ("JSONL with CRLF, blank lines, extra fields",
     lambda root: write_split(root, "train", [row | {"source": "notepad"} for row in TRAIN_ROWS], newline="\r\n\r\n"),
     [], None),
    ("JSONL with non-UTF-8 bytes", lambda root: write_split(root, "train", TRAIN_ROWS, encoding="latin-1"), [],
     r"train\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 67 of the line\); save the file as UTF-8$"),
]


def run_data_path(overrides: list[str]) -> str | None:
    """Put every sample through the run's own data path (the datamodule from the composed config, setup and
    every loader, as fit and test use them); the message of the DataError the run stops with, or None."""
    datamodule = instantiate(compose(overrides).data)
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        loaders = [datamodule.train_dataloader(), datamodule.val_dataloader()]
        datamodule.setup("test")
        for loader in [*loaders, *datamodule.test_dataloader()]:
            for _ in loader:
                pass
    except DataError as err:
        return str(err)
    return None


@pytest.mark.parametrize(("change", "extra", "expected"), [case[1:] for case in HARD_INPUTS],
                         ids=[case[0] for case in HARD_INPUTS])
def test_the_data_doctor_and_the_run_agree(tmp_path: Path, capsys, change, extra: list[str],
                                           expected: str | None) -> None:
    root = custom_benchmark(tmp_path)
    change(root)
    overrides = ["data=custom", f"data.split_root={root / 'splits'}", f"data.image_root={root / 'images'}",
                 "data.batch_size=2", "data.num_workers=0", *extra]
    stopped = run_data_path(overrides)
    code = check.main([*overrides, "output=json"])
    report = json.loads(capsys.readouterr().out)
    unusable = {name: split["problems"] for name, split in report["splits"].items() if not split["usable"]}
    if expected is None:
        assert stopped is None and code == 0 and not unusable, (stopped, unusable)
    else:
        assert stopped is not None and re.search(expected, stopped), stopped
        assert code == 1 and len(unusable) == 1 and stopped in next(iter(unusable.values())), (stopped, unusable)


def test_the_doctor_counts_boxes_entirely_and_partly_outside_apart(tmp_path: Path, capsys) -> None:
    root = custom_benchmark(tmp_path)
    write_split(root, "train", [*train_box([100, 60, 120, 90]), TRAIN_ROWS[0] | {"bbox": [-10, 4, 90, 30]}])
    args = [f"data.split_root={root / 'splits'}", f"data.image_root={root / 'images'}", "data.batch_size=2"]
    assert check.main(["data=custom", *args, "data.bad_records=skip", "splits=train", "output=json"]) == 0
    train = json.loads(capsys.readouterr().out)["splits"]["train"]
    counts = (train["boxes_entirely_outside_image"], train["boxes_partly_outside_image"], train["bad_records"])
    assert counts == (1, 1, 1) and train["usable"]
    skipped = "records a run skips (data.bad_records=skip): 1, e.g. box outside the image: "
    assert any(problem.startswith(skipped) for problem in train["problems"])


@pytest.mark.parametrize(("encoding", "match"), [("utf-8-sig", None), ("latin-1", r"q\.jsonl:2: not UTF-8 text")])
def test_predict_inputs_file_as_other_tools_write_it(tmp_path: Path, encoding: str, match: str | None) -> None:
    rows = [{"box_format": "xywh"}, {"image": "a.png", "phrase": "the café", "bbox": [1, 2, 3, 4]}]
    (tmp_path / "q.jsonl").write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode(encoding))
    if match is None:
        assert predict.read_queries(tmp_path / "q.jsonl", None, "xyxy") == [
            predict.Query(tmp_path / "a.png", "the café", (1.0, 2.0, 4.0, 6.0))]
    else:
        with pytest.raises(SplitFileError, match=match):
            predict.read_queries(tmp_path / "q.jsonl", None, "xyxy")


# ------------------------------------------------------------------------------- whole runs


def referit_job(root: Path, out: Path, *extra: str) -> list[str]:
    """A 1-epoch run of the tiny default model on a small ReferIt-style benchmark (no pretraining stages)."""
    return ["data=referit", f"data.split_root={root / 'splits'}", f"data.image_root={root / 'images'}",
            "data.test_splits=[test]", "data.batch_size=2", "data.num_workers=0", "data.augment.enabled=false",
            "vision_pretraining=null", "text_pretraining=null", "trainer.max_epochs=1", "logger=csv",
            "visualize=2", "shuffled_text_check=false", "callbacks.progress_bar=null", f"paths.output_dir={out}",
            *extra]


@pytest.mark.slow
def test_skip_policy_run_reports_what_it_left_out(tmp_path: Path) -> None:
    extra = {"val": [("val_0.jpg", "x", [50, 10, 50, 30], "degenerate", [])]}
    root = make_referit_root(tmp_path / "data", {"train": 6, "val": 3, "test": 3}, extra=extra)
    truncated_jpeg(root / "images" / "train_1.jpg")
    (root / "images" / "test_2.jpg").unlink()
    # batch size 1: the bad records' batches are empty, so the train and test steps meet empty batches too
    run(compose(referit_job(root, tmp_path / "run", "data.bad_records=skip", "data.batch_size=1")))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    problems = results["data_problems"]
    assert problems["dropped_at_reading"] == {"val": {"degenerate box": 1}}
    assert problems["skipped"]["train"]["count"] == 1 and "train_1.jpg" in problems["skipped"]["train"]["examples"][0]
    assert problems["skipped"]["test/test"] == {"count": 1, "kinds": {"unreadable image": 1},
                                                "examples": [problems["skipped"]["test/test"]["examples"][0]]}
    assert results["splits"]["test"]["n"] == 2  # the skipped record is not scored


@pytest.mark.slow
def test_fail_policy_run_records_the_failure_naming_the_record(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path / "data", {"train": 4, "val": 2, "test": 1})
    (root / "images" / "train_2.jpg").write_bytes(b"garbage")
    with pytest.raises(BadRecordError, match=r"referit_train\.pth: record 2 \(train_2\.jpg"):
        run(compose(referit_job(root, tmp_path / "run")))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "train_2.jpg" in results["reason"]


# ------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small checkpoint of the tiny default model with LoRA (untrained: only the mechanics matter here)."""
    cfg = compose(["peft=lora", "vision_pretraining=null", "text_pretraining=null", "paths.output_dir=unused"])
    return save(build_seeded_module(cfg), tmp_path_factory.mktemp("ckpt") / "lora.ckpt")


@pytest.mark.parametrize("mode,suffix", [("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg"), ("I;16", "png")])
def test_predict_takes_every_image_mode(untrained_checkpoint: Path, tmp_path: Path, mode: str, suffix: str) -> None:
    path = tmp_path / f"image.{suffix}"
    mode_image(mode).save(path)
    [result] = predict.Predictor(untrained_checkpoint).predict([predict.Query(path, "the bright half")])
    x1, y1, x2, y2 = result.box
    assert 0 <= x1 <= x2 <= 40 and 0 <= y1 <= y2 <= 30


def test_predict_tiny_huge_and_exif_rotated_pictures(untrained_checkpoint: Path, tmp_path: Path) -> None:
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    Image.new("RGB", (10000, 30)).save(tmp_path / "huge.png")
    exif_rotated(tmp_path / "phone.jpg")
    predictor = predict.Predictor(untrained_checkpoint)
    tiny, huge, phone = predictor.predict([predict.Query(tmp_path / n, "it") for n in ("tiny.png", "huge.png",
                                                                                       "phone.jpg")])
    assert all(0 <= v <= 1 for v in tiny.box) and huge.box[2] <= 10000 and huge.box[3] <= 30
    assert phone.box[2] <= 20 and phone.box[3] <= 60  # in the upright picture's pixels
    stored = predict.Predictor(untrained_checkpoint, exif_transpose=False).predict([phone.query])[0]
    assert stored.box[2] <= 60 and stored.box[3] <= 20


def test_predict_bad_queries_fail_or_are_reported(untrained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    Image.new("RGB", (30, 30)).save(tmp_path / "ok.png")
    truncated_jpeg(tmp_path / "cut.jpg")
    ckpt = f"ckpt={untrained_checkpoint}"
    with pytest.raises(SystemExit, match=r"unreadable image: query \(.*cut\.jpg"):
        predict.main([ckpt, f"image={tmp_path / 'cut.jpg'}", "text=the cat", "draw=false"])
    with pytest.raises(SystemExit, match="empty phrase"):
        predict.main([ckpt, f"image={tmp_path / 'ok.png'}", "text=  ", "draw=false"])
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join(json.dumps(q) for q in [{"image": "ok.png", "phrase": "the cat 🐱 左"},
                                                         {"image": "cut.jpg", "phrase": "the dog"},
                                                         {"image": "missing.png", "phrase": "x"},
                                                         {"image": "ok.png", "phrase": ""}]))
    with pytest.raises(BadRecordError, match="cut.jpg"):
        predict.main([ckpt, f"inputs={queries}", "draw=false"])
    output = f"output={tmp_path / 'o.jsonl'}"
    assert predict.main([ckpt, f"inputs={queries}", "draw=false", "on_error=skip", output]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert "box" in rows[0] and [r.get("error", "").split(":")[0] for r in rows[1:]] == [
        "unreadable image", "unreadable image", "empty phrase"]
    assert "3 queries skipped" in capsys.readouterr().err
    (tmp_path / "none.jsonl").write_text("\n\n")
    with pytest.raises(SplitFileError, match=r"none\.jsonl: no queries"):
        predict.main([ckpt, f"inputs={tmp_path / 'none.jsonl'}"])


# ------------------------------------------------------------------------------- pickles


class CreatesAFile:
    """A pickle payload that would create a file if it were ever unpickled without restrictions."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_carrying_a_code_payload_is_refused_and_never_executed(untrained_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    checkpoint = torch.load(untrained_checkpoint, weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["extra"] = CreatesAFile(marker)
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="system") as refused:
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists(), refused.value
    with pytest.raises(Exception, match="system"):
        predict.Predictor(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.slow
def test_resuming_from_a_checkpoint_with_a_code_payload_is_refused(untrained_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(untrained_checkpoint, weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["extra"] = CreatesAFile(marker)
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    job = [f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'run'}", *TINY_JOB, "logger=csv",
           "vision_pretraining=null", "text_pretraining=null", f"ckpt_path={tmp_path / 'evil.ckpt'}"]
    with pytest.raises(Exception, match="system"):
        run(compose(job))  # Lightning restores it with weights_only=True
    assert not marker.exists()
