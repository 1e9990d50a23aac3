"""GroundingDataModule, RecordDataset and collate on small generated benchmarks; the Hydra data configs."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from src.data.datamodule import GroundingDataModule
from src.data.dataset import CachedSamples, derangement
from src.data.problems import BadRecordError
from src.data.records import Record

CONF = Path(__file__).resolve().parents[1] / "conf"
DATA_CONFIGS = sorted(p.stem for p in (CONF / "data").glob("*.yaml") if not p.stem.startswith("_"))
PHRASES = [
    "red car on the left",
    "the tall tree",
    "a dog",
    "sky",
    "bright lamp",
    "woman in blue",
    "the bench",
]


def make_benchmark_root(root: Path, dataset: str, sizes: dict[str, int],
                        extra: dict[str, list[tuple]] | None = None) -> Path:
    """Write a TransVG-layout benchmark: images/ and splits/<dataset>/<dataset>_<split>.pth.

    Boxes are [4 + i, 5, 30 + i, 40], inside every image whether read as xyxy (ReferIt) or xywh (RefCOCO).
    """
    (root / "images").mkdir(parents=True)
    (root / "splits" / dataset).mkdir(parents=True)
    for split, n in sizes.items():
        records = []
        for i in range(n):
            name = f"{split}_{i}.jpg"
            colour = (40 * i % 255, 90, 200 - 20 * i % 200)
            Image.new("RGB", (64 + 8 * i, 48), colour).save(root / "images" / name)
            records.append((name, f"{i}_1.pth", [4 + i, 5, 30 + i, 40], PHRASES[i % len(PHRASES)], []))
        records += (extra or {}).get(split, [])
        torch.save(
            records,
            root / "splits" / dataset / f"{dataset}_{split}.pth",
            _use_new_zipfile_serialization=False,
        )
    return root


def make_referit_root(root: Path, sizes: dict[str, int], extra: dict[str, list[tuple]] | None = None) -> Path:
    """A ReferIt-style benchmark (xyxy int boxes); see make_benchmark_root."""
    return make_benchmark_root(root, "referit", sizes, extra)


def make_dm(root: Path, **kwargs) -> GroundingDataModule:
    settings = dict(
        dataset="referit",
        split_root=str(root / "splits"),
        image_root=str(root / "images"),
        test_splits=["val", "test"],
        batch_size=4,
        num_workers=0,
        image_size=64,
        max_query_len=12,
    )
    settings.update(kwargs)
    return GroundingDataModule(**settings)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_referit_root(tmp_path, {"train": 7, "val": 5, "test": 6})


def test_train_batch_follows_the_contract(root: Path) -> None:
    dm = make_dm(root)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    expected = {
        "image": ((4, 3, 64, 64), torch.float32),
        "pixel_mask": ((4, 64, 64), torch.bool),
        "text_ids": ((4, 12), torch.long),
        "text_mask": ((4, 12), torch.long),
        "prior_ids": ((4, 12), torch.long),
        "prior_mask": ((4, 12), torch.long),
        "box": ((4, 4), torch.float32),
        "index": ((4,), torch.long),
    }
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert bool((batch["text_ids"][:, 0] == 101).all()) and bool((batch["prior_ids"][:, 0] == 49406).all())
    assert len(batch["phrase"]) == 4 and all(isinstance(p, str) for p in batch["phrase"])
    assert all(f.startswith("train_") for f in batch["image_file"])
    assert bool(((batch["box"] >= 0) & (batch["box"] <= 1)).all())
    assert len(dm.train_dataloader()) == 1  # 7 records, batch 4, drop_last


def test_eval_batches_are_deterministic_and_centred(root: Path) -> None:
    dm = make_dm(root)
    dm.setup("validate")
    first, second = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["box"], second["box"])
    assert first["index"].tolist() == [0, 1, 2, 3]
    assert first["phrase"] == [p.lower() for p in PHRASES[:4]]


def test_test_loaders_follow_test_splits_order(root: Path) -> None:
    dm = make_dm(root, test_splits=["test", "val"])
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert dm.test_split_names == ["test", "val"]
    assert [len(loader.dataset) for loader in loaders] == [6, 5]
    assert next(iter(loaders[0]))["image_file"][0] == "test_0.jpg"


def test_degenerate_boxes_are_dropped_logged_and_counted(tmp_path: Path, caplog) -> None:
    bad = [
        ("train_0.jpg", "9_1.pth", [10, 10, 10, 30], "flat box", []),
        ("train_1.jpg", "9_2.pth", [5, 9, 2, 20], "x", []),
    ]
    root = make_referit_root(tmp_path, {"train": 4, "val": 2, "test": 2}, extra={"train": bad})
    dm = make_dm(root)
    with caplog.at_level(logging.WARNING, logger="src.data.datamodule"):
        dm.setup("fit")
    assert dm.dropped == {"train": 2, "val": 0}
    assert len(dm.datasets["train:train"]) == 4
    assert "dropped 2 of 6 records" in caplog.text and "flat box" in caplog.text
    keep = make_dm(root, reader={"drop_degenerate": False})
    assert len(keep.make_dataset("train", train=True)) == 6


def test_shuffled_text_loader_deranges_phrases_and_keeps_boxes(root: Path) -> None:
    dm = make_dm(root, batch_size=8)
    plain = next(iter(dm.val_dataloader()))
    shuffled = next(iter(dm.shuffled_text_dataloader("val")))
    again = next(iter(dm.shuffled_text_dataloader("val")))
    assert torch.equal(plain["box"], shuffled["box"]) and plain["image_file"] == shuffled["image_file"]
    assert all(a != b for a, b in zip(plain["phrase"], shuffled["phrase"], strict=True))
    assert sorted(plain["phrase"]) == sorted(shuffled["phrase"])
    assert shuffled["phrase"] == again["phrase"]


def test_shuffled_text_from_cached_samples_equals_the_computed_one(root: Path) -> None:
    """With cached eval samples the shuffled-text loader reuses their images; the batch must not change."""
    computed = make_dm(root, batch_size=8)
    cached = make_dm(root, batch_size=8, cache_samples=True)
    cached.setup("validate")
    assert isinstance(cached.datasets["val"], CachedSamples)
    loader = cached.shuffled_text_dataloader("val")
    assert isinstance(loader.dataset, CachedSamples)  # derived, not computed again
    a, b = next(iter(computed.shuffled_text_dataloader("val"))), next(iter(loader))
    for key in ("image", "pixel_mask", "text_ids", "text_mask", "prior_ids", "prior_mask", "box", "index"):
        assert torch.equal(a[key], b[key]), key
    assert a["phrase"] == b["phrase"] and a["image_file"] == b["image_file"]
    plain = next(iter(cached.val_dataloader()))
    assert plain["phrase"] != b["phrase"]  # the cached plain samples are untouched


def test_tokens_are_remembered_per_phrase(root: Path) -> None:
    dataset = make_dm(root).make_dataset("val", train=False)
    first = dataset[0]
    assert dataset.tokens(first["phrase"])[0] is first["text_ids"]  # read back, not tokenised again
    ids, mask = dataset.bert_tok([first["phrase"]], dataset.max_query_len)
    assert torch.equal(first["text_ids"], ids[0]) and torch.equal(first["text_mask"], mask[0])


def test_derangement_has_no_fixed_points() -> None:
    for n in (2, 3, 10, 101):
        for seed in range(3):
            perm = derangement(n, seed)
            assert sorted(perm) == list(range(n)) and all(i != j for i, j in enumerate(perm))
    assert derangement(50, 7) == derangement(50, 7)
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_workers_load_batches(root: Path) -> None:
    dm = make_dm(root, num_workers=2)
    assert sum(len(b["index"]) for b in dm.val_dataloader()) == 5


def test_unreadable_image_names_file_and_record(root: Path) -> None:
    (root / "images" / "val_2.jpg").write_bytes(b"not a jpeg")
    dataset = make_dm(root).make_dataset("val", train=False)
    with pytest.raises(BadRecordError, match=r"unreadable image: .*referit_val\.pth: record 2 \(val_2\.jpg, 'a dog'\)"):
        dataset[2]
    (root / "images" / "val_3.jpg").unlink()
    with pytest.raises(BadRecordError, match=r"record 3.*val_3\.jpg"):
        dataset[3]


def test_official_mode_truncates_boxes_to_ints(tmp_path: Path) -> None:
    extra = {"val": [("val_0.jpg", "9_1.pth", [1.7, 2.2, 30.9, 40.5], "float box", [])]}
    root = make_referit_root(tmp_path, {"train": 2, "val": 1, "test": 1}, extra=extra)
    assert make_dm(root, mode="official").read_split("val")[1].box == (1.0, 2.0, 30.0, 40.0)
    assert make_dm(root, mode="clean").read_split("val")[1].box == (1.7, 2.2, 30.9, 40.5)


def test_custom_jsonl_benchmark(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (50, 40), (200, 10, 10)).save(tmp_path / "images" / "a.png")
    lines = [
        {"box_format": "xywh"},
        {"image": "a.png", "bbox": [5, 6, 20, 10], "phrase": "the red square"},
    ] * 1
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    dm = GroundingDataModule(
        "custom",
        split_root=str(tmp_path),
        image_root=str(tmp_path / "images"),
        test_splits=["test"],
        image_size=32,
        max_query_len=8,
        num_workers=0,
    )
    assert dm.read_split("val") == [Record("a.png", (5.0, 6.0, 25.0, 16.0), "the red square")]
    assert next(iter(dm.test_dataloader()[0]))["image"].shape == (1, 3, 32, 32)


def test_refer_format_through_the_datamodule(tmp_path: Path) -> None:
    (tmp_path / "refcoco").mkdir()
    refs = [
        {
            "ref_id": 0,
            "ann_id": 5,
            "image_id": 9,
            "split": "testB",
            "sentences": [{"sent": "left zebra"}, {"sent": "zebra on left"}],
        }
    ]
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {
        "images": [{"id": 9, "file_name": "x.jpg", "height": 10, "width": 10}],
        "categories": [],
        "annotations": [{"id": 5, "image_id": 9, "category_id": 1, "bbox": [1, 2, 3, 4]}],
    }
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps(instances))
    dm = GroundingDataModule(
        "unc", split_root=str(tmp_path), reader={"format": "refer"}, data_root=str(tmp_path)
    )
    image = "COCO_train2014_000000000009.jpg"
    assert dm.read_split("testB") == [
        Record(image, (1.0, 2.0, 4.0, 6.0), "left zebra"),
        Record(image, (1.0, 2.0, 4.0, 6.0), "zebra on left"),
    ]
    assert dm.split_file("testB") == tmp_path / "refcoco" / "refs(unc).p"
    assert dm.image_root == tmp_path / "other/images/mscoco/images/train2014"


def test_bad_settings_fail_early(root: Path) -> None:
    with pytest.raises(ValueError, match="no split 'testA'"):
        make_dm(root, test_splits=["testA"])
    with pytest.raises(ValueError, match="mode"):
        make_dm(root, mode="faithful")
    with pytest.raises(ValueError, match="unknown reader settings"):
        make_dm(root, reader={"boxformat": "xyxy"})
    with pytest.raises(ValueError, match="no REFER-format release"):
        make_dm(root, reader={"format": "refer"}).read_split("val")


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_composes_and_instantiates(name: str, tmp_path: Path) -> None:
    overrides = [f"data={name}", f"paths.data_root={tmp_path}", f"paths.cache_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dm = instantiate(cfg.data)
    assert isinstance(dm, GroundingDataModule)
    assert dm.image_size == cfg.model.image_size and dm.max_query_len == cfg.model.max_query_len
    assert dm.mode == cfg.model.mode and dm.test_split_names


def test_synthetic_config_generates_and_loads(tmp_path: Path) -> None:
    overrides = [
        "data=synthetic",
        f"paths.cache_dir={tmp_path}",
        "data.synthetic.n_train=4",
        "data.synthetic.n_val=2",
        "data.synthetic.n_test=2",
        "data.num_workers=0",
        "data.batch_size=4",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.split_root.parent.parent == tmp_path and dm.image_root.is_dir()
    batch = next(iter(dm.train_dataloader()))
    size = cfg.model.image_size
    assert batch["image"].shape == (4, 3, size, size) and batch["text_ids"].shape == (
        4,
        cfg.model.max_query_len,
    )
    assert len(dm.datasets["val"]) == 4 and dm.dropped == {"train": 0, "val": 0}


def test_cached_samples_equal_the_computed_ones_and_load_without_workers(root: Path) -> None:
    plain = make_dm(root, augment={"enabled": False})
    cached = make_dm(root, augment={"enabled": False}, cache_samples=True, num_workers=2)
    for dm in (plain, cached):
        dm.setup("fit")
    assert isinstance(cached.datasets["train:train"], CachedSamples)
    assert isinstance(cached.datasets["val"], CachedSamples)
    for key in ("train:train", "val"):
        for a, b in zip(plain.datasets[key], cached.datasets[key], strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["box"], b["box"])
            assert torch.equal(a["text_ids"], b["text_ids"]) and a["phrase"] == b["phrase"]
    assert cached.train_dataloader().num_workers == 0 and plain.train_dataloader().num_workers == 0


def test_random_train_transforms_are_never_cached(root: Path) -> None:
    dm = make_dm(root, cache_samples=True, num_workers=1)
    dm.setup("fit")
    assert not isinstance(dm.datasets["train:train"], CachedSamples)  # augmentation is on
    assert isinstance(dm.datasets["val"], CachedSamples)
    assert dm.train_dataloader().num_workers == 1


def test_pretraining_corpus_is_a_separate_synthetic_draw(tmp_path: Path) -> None:
    dm = GroundingDataModule(dataset="synthetic", cache_dir=str(tmp_path), num_workers=0, image_size=64,
                             synthetic={"seed": 0, "n_train": 3, "n_val": 1, "n_test": 1})
    corpus = dm.pretraining_corpus(seed=7, scenes=4)
    assert corpus != dm.generated_root()
    records = torch.load(corpus / "splits" / "synthetic" / "synthetic_train.pth", weights_only=True)
    benchmark = torch.load(dm.split_file("train"), weights_only=True)
    assert len({r[0] for r in records}) == 4
    assert [r[3] for r in records[:6]] != [r[3] for r in benchmark[:6]]
    with pytest.raises(ValueError, match="seed other than"):
        dm.pretraining_corpus(seed=0, scenes=4)


def test_pretraining_corpus_can_withhold_what_the_benchmark_asks_for(tmp_path: Path) -> None:
    from src.data.synthetic import record_attributes, split_path

    dm = GroundingDataModule(dataset="synthetic", cache_dir=str(tmp_path), num_workers=0, image_size=64,
                             synthetic={"seed": 0, "n_train": 6, "n_val": 1, "n_test": 1},
                             pretraining_synthetic={"colours": ["red", "blue"], "shapes": ["circle", "square"],
                                                    "kind_weights": [1, 0, 0, 0]})
    corpus = torch.load(split_path(dm.pretraining_corpus(seed=7, scenes=20), "train"), weights_only=True)
    objects = [o for r in corpus for o in record_attributes(r)["scene"]["objects"]]
    assert {o["colour"] for o in objects} == {"red", "blue"} and {o["shape"] for o in objects} == {"circle", "square"}
    assert {record_attributes(r)["expression"]["kind"] for r in corpus} == {"np"}
    benchmark = torch.load(dm.split_file("train"), weights_only=True)
    assert len({o["colour"] for r in benchmark for o in record_attributes(r)["scene"]["objects"]}) > 2
    with pytest.raises(ValueError, match="pretraining_corpus.seed"):
        GroundingDataModule(dataset="synthetic", cache_dir=str(tmp_path), synthetic={"seed": 0},
                            pretraining_synthetic={"seed": 3}).pretraining_corpus(seed=7, scenes=2)


def test_sample_cache_stays_within_its_byte_budget(root: Path, caplog) -> None:
    from src.data.dataset import CachedSamples, sample_bytes

    probe = make_dm(root, augment={"enabled": False})
    probe.setup("fit")
    train_bytes = sample_bytes(probe.datasets["train:train"][0]) * 7
    budget_mb = (train_bytes + 1000) / 2**20  # room for the train split, not for val besides it
    dm = make_dm(root, augment={"enabled": False}, cache_samples=True, cache_max_mb=budget_mb)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert isinstance(dm.datasets["train:train"], CachedSamples)
    assert abs(dm.datasets["train:train"].nbytes - train_bytes) <= 8 * 7  # plus each sample's image digest
    assert not isinstance(dm.datasets["val"], CachedSamples)
    assert "val is not cached" in caplog.text and "data.cache_max_mb" in caplog.text
    batch = next(iter(dm.val_dataloader()))  # served computed on the fly, the same contract
    assert batch["image"].shape[0] == 4
    unbounded = make_dm(root, augment={"enabled": False}, cache_samples=True, cache_max_mb=None)
    unbounded.setup("fit")
    assert all(isinstance(d, CachedSamples) for d in unbounded.datasets.values())
