"""Tests of the procedural referring-scene benchmark (src/data/synthetic.py)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from src.data import synthetic
from src.data.synthetic import (
    SPLITS,
    SyntheticSettings,
    ensure_synthetic,
    phrase_blind_baselines,
    record_attributes,
    referents,
    render,
    resolve,
    settings_hash,
    split_path,
)

TINY: dict[str, Any] = {"seed": 7, "n_train": 24, "n_val": 6, "n_test": 12}


def _load(root: Path, split: str) -> list[tuple[Any, ...]]:
    return torch.load(split_path(root, split), weights_only=True)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("cache"), **TINY)


def test_layout_and_weights_only_load(tiny_root: Path) -> None:
    assert tiny_root.name == f"synthetic-{settings_hash(SyntheticSettings(**TINY))}"
    assert (tiny_root / "settings.json").is_file()
    for split in SPLITS:
        records = _load(tiny_root, split)  # weights_only=True must accept the file
        assert isinstance(records, list) and records
        for rec in records:
            image_file, ann_id, box, phrase, attributes = rec
            assert isinstance(image_file, str) and (tiny_root / "images" / image_file).is_file()
            assert isinstance(ann_id, int)
            assert isinstance(box, list) and len(box) == 4 and all(isinstance(v, float) for v in box)
            assert isinstance(phrase, str) and phrase.startswith("the ")
            assert isinstance(attributes, str)  # JSON: nested dicts unpickle slowly under weights_only
            assert set(record_attributes(rec)) == {"scene", "target", "kind", "expression"}


def test_split_sizes_and_disjointness(tiny_root: Path) -> None:
    st = SyntheticSettings(**TINY)
    files: dict[str, set[str]] = {}
    digests: dict[str, set[str]] = {}
    ann_ids: list[int] = []
    for split in SPLITS:
        records = _load(tiny_root, split)
        assert len(records) == st.n_scenes(split) * st.refs_per_scene
        files[split] = {r[0] for r in records}
        assert len(files[split]) == st.n_scenes(split)
        digests[split] = {
            hashlib.sha256(np.asarray(Image.open(tiny_root / "images" / f)).tobytes()).hexdigest() for f in files[split]
        }
        ann_ids += [r[1] for r in records]
        # Each scene's records refer to different objects.
        per_image: dict[str, list[int]] = {}
        for r in records:
            per_image.setdefault(r[0], []).append(record_attributes(r)["target"])
        assert all(len(t) == len(set(t)) for t in per_image.values())
    assert len(ann_ids) == len(set(ann_ids))
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not files[a] & files[b]
            assert not digests[a] & digests[b]  # different random streams -> different pixels


def test_boxes_inside_images_and_tight(tiny_root: Path) -> None:
    for split in SPLITS:
        for record in _load(tiny_root, split):
            image_file, box, attrs = record[0], record[2], record_attributes(record)
            image = np.asarray(Image.open(tiny_root / "images" / image_file).convert("RGB")).astype(int)
            h, w = image.shape[:2]
            scene = attrs["scene"]
            assert (scene["width"], scene["height"]) == (w, h)
            assert box == scene["objects"][attrs["target"]]["box"]
            chroma = image.max(axis=2) - image.min(axis=2)  # objects are saturated, backgrounds muted
            for obj in scene["objects"]:
                x1, y1, x2, y2 = (int(v) for v in obj["box"])
                assert obj["box"] == [float(v) for v in (x1, y1, x2, y2)]
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
                assert x2 - x1 >= 8 and y2 - y1 >= 8
                # Tight: every border line of the box touches the shape, the ring just outside does not.
                assert chroma[y1, x1:x2].max() > 80 and chroma[y2 - 1, x1:x2].max() > 80
                assert chroma[y1:y2, x1].max() > 80 and chroma[y1:y2, x2 - 1].max() > 80
                ring = [chroma[y1 - 1, x1:x2], chroma[y2, x1:x2], chroma[y1:y2, x1 - 1], chroma[y1:y2, x2]]
                assert all(r.max() <= 80 for r in ring)


def test_every_expression_has_exactly_its_target(tiny_root: Path) -> None:
    for split in SPLITS:
        for record in _load(tiny_root, split):
            box, phrase, attrs = record[2], record[3], record_attributes(record)
            expr, objects, target = attrs["expression"], attrs["scene"]["objects"], attrs["target"]
            assert render(expr) == phrase
            assert referents(expr, objects, strict=True) == [target]
            assert referents(expr, objects, strict=False) == [target]
            assert resolve(expr, objects) == target
            assert objects[target]["box"] == box
            assert attrs["kind"] == expr["kind"]


def test_semantics_on_a_hand_made_scene() -> None:
    objects = [
        {"shape": "circle", "colour": "red", "box": [0.0, 0.0, 20.0, 20.0]},
        {"shape": "circle", "colour": "red", "box": [50.0, 0.0, 80.0, 30.0]},
        {"shape": "square", "colour": "blue", "box": [25.0, 40.0, 45.0, 60.0]},
    ]

    def np_(colour: str = "", shape: str = "", size: str = "") -> dict[str, str]:
        return {"size": size, "colour": colour, "shape": shape}

    def ex(kind: str, np: dict[str, str], direction: str = "", anchor: dict[str, str] | None = None) -> Any:
        return {"kind": kind, "np": np, "direction": direction, "anchor": anchor or {}, "forms": [0, 0, 0]}

    assert resolve(ex("np", np_("red", "circle")), objects) is None  # two red circles
    assert resolve(ex("np", np_("blue")), objects) == 2
    assert resolve(ex("size", np_("red", "circle", "big")), objects) == 1  # 900 vs 400 px^2
    assert resolve(ex("size", np_("", "circle", "small")), objects) == 0
    assert resolve(ex("size", np_("blue", "", "big")), objects) is None  # size words are contrastive
    assert resolve(ex("extreme", np_("", "circle"), "left"), objects) == 0
    assert resolve(ex("extreme", np_("", "circle"), "right"), objects) == 1
    assert resolve(ex("extreme", np_(), "bottom"), objects) == 2
    assert resolve(ex("extreme", np_("", "circle"), "top"), objects) is None  # 5 px apart: too close to call
    assert resolve(ex("relation", np_("", "circle"), "left", np_("", "square")), objects) == 0
    assert resolve(ex("relation", np_("red"), "above", np_("blue")), objects) is None  # both red circles are above
    assert render(ex("extreme", np_("red"), "left")) == "the red one on the left"
    assert render(ex("relation", np_("", "circle"), "right", np_("blue", "square"))) == (
        "the circle right of the blue square"
    )


def test_left_right_are_separate_words(tiny_root: Path) -> None:
    phrases = [r[3] for split in SPLITS for r in _load(tiny_root, split)]
    for p in phrases:
        for token in re.findall(r"[a-z]*(?:left|right)[a-z]*", p):
            assert token in ("left", "right"), p


def test_deterministic(tmp_path: Path, tiny_root: Path) -> None:
    other = ensure_synthetic(tmp_path / "again", **TINY)
    assert other != tiny_root and other.name == tiny_root.name
    for split in SPLITS:
        assert split_path(other, split).read_bytes() == split_path(tiny_root, split).read_bytes()
    images = sorted(p.name for p in (tiny_root / "images").iterdir())
    assert images == sorted(p.name for p in (other / "images").iterdir())
    for name in images:
        assert (other / "images" / name).read_bytes() == (tiny_root / "images" / name).read_bytes()
    # Another seed gives other data.
    third = ensure_synthetic(tmp_path / "again", **{**TINY, "seed": 8})
    assert third != other
    assert split_path(third, "train").read_bytes() != split_path(other, "train").read_bytes()


def test_cached_second_call_does_not_regenerate(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("regenerated")

    monkeypatch.setattr(synthetic, "_generate_split", boom)
    assert ensure_synthetic(tiny_root.parent, **TINY) == tiny_root
    # Lists (as a YAML config gives them) hash like tuples.
    assert ensure_synthetic(tiny_root.parent, **{**TINY, "objects_range": [3, 5]}) == tiny_root


def test_interrupted_generation_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic._generate_split

    def fail_on_test(st: SyntheticSettings, split: str, root: Path) -> None:
        if split == "test":
            raise KeyboardInterrupt
        real(st, split, root)

    monkeypatch.setattr(synthetic, "_generate_split", fail_on_test)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path, **TINY)

    def entries() -> list[str]:  # the builders' lock files are not cache entries
        return [p.name for p in tmp_path.iterdir() if p.suffix != ".lock"]

    assert entries() == []
    monkeypatch.setattr(synthetic, "_generate_split", real)
    root = ensure_synthetic(tmp_path, **TINY)
    assert entries() == [root.name]


def test_phrase_blind_rules_are_near_chance(tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path, seed=3, n_train=0, n_val=0, n_test=300)
    records = _load(root, "test")
    scores = phrase_blind_baselines(records)
    assert 0.2 < scores["uniform"] < 0.34
    for rule in ("largest", "smallest", "central", "left", "right", "top", "bottom"):
        assert scores[rule] < 0.36, (rule, scores[rule])
    kinds = {record_attributes(r)["kind"] for r in records}
    assert kinds == {"np", "size", "extreme", "relation"}
    expressions = [record_attributes(r)["expression"] for r in records]
    with_attribute = sum(bool(e["np"]["colour"] or e["np"]["shape"]) for e in expressions)
    assert with_attribute / len(records) > 0.6


def test_settings_validation() -> None:
    with pytest.raises(TypeError):
        SyntheticSettings(n_scenes=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        SyntheticSettings(objects_range=(1, 3))
    with pytest.raises(ValueError):
        SyntheticSettings(refs_per_scene=4, objects_range=(3, 5))
    with pytest.raises(ValueError):
        SyntheticSettings(colours=("red", "magenta"))
    with pytest.raises(ValueError):
        SyntheticSettings(width_range=(30, 40))
