"""Transforms on the real photos: the box stays on the object through resize, flip and crop; text, masks."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSettings,
    EvalTransform,
    TrainTransform,
    Transformed,
    build_transform,
    centre_offset,
    crop_accepted,
    long_side_scales,
    names_direction,
    swap_left_right,
)
from src.quirks import AugmentQuirks
from tests.conftest import SHARED

PHOTOS = SHARED / "data" / "photos"
pytestmark = pytest.mark.skipif(
    not (PHOTOS / "annotations.json").is_file(),
    reason=f"real photos not found at {PHOTOS} (only in the development workspace)",
)

# Deterministic geometry: no photometric change, no translation, one scale.
STILL = AugmentSettings(jitter_p=0.0, blur_p=0.0, translate=False, num_scales=1, crop_p=0.0, flip_p=0.0)


def _photo_records() -> list[tuple[Image.Image, tuple[float, ...], str]]:
    """The real photos' records: (PIL image, x1y1x2y2 box, expression)."""
    annotations = json.loads((PHOTOS / "annotations.json").read_text())
    images = {name: Image.open(PHOTOS / name).convert("RGB") for name in annotations["images"]}
    return [(images[r[0]], tuple(float(v) for v in r[2]), r[3]) for r in annotations["records"]]


@pytest.fixture(scope="module")
def photos() -> list[tuple[Image.Image, tuple[float, ...], str]]:
    return _photo_records()


def _canvas_xyxy(out: Transformed, size: int) -> list[float]:
    """The output box in canvas pixels, xyxy."""
    cx, cy, w, h = (out.box * size).tolist()
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def _pixels(out: Transformed) -> np.ndarray:
    """The canvas un-normalised to [0, 1] RGB, HWC."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (out.image * std + mean).permute(1, 2, 0).numpy()


def _box_correlation(out: Transformed, size: int, image: Image.Image, box: tuple[float, ...]) -> float:
    """Correlation between the canvas inside the output box and the original inside box (same resolution)."""
    x1, y1, x2, y2 = (round(v) for v in _canvas_xyxy(out, size))
    inside = Image.fromarray((_pixels(out)[y1:y2, x1:x2] * 255).round().astype(np.uint8))
    original = image.crop(tuple(round(v) for v in box)).resize(inside.size, Image.BILINEAR)
    if out.meta.flipped:
        original = original.transpose(Image.FLIP_LEFT_RIGHT)
    a, b = np.asarray(inside, dtype=float).ravel(), np.asarray(original, dtype=float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def _check_canvas(out: Transformed, size: int) -> None:
    """Shapes and dtypes of one sample; the mask marks exactly the padding, which is 0."""
    assert out.image.shape == (3, size, size) and out.image.dtype == torch.float32
    assert out.pixel_mask.shape == (size, size) and out.pixel_mask.dtype == torch.bool
    assert out.box.shape == (4,) and bool(((out.box >= 0) & (out.box <= 1)).all())
    (dx, dy), (w, h) = out.meta.offset, out.meta.placed_size
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[dy : dy + h, dx : dx + w] = True
    assert torch.equal(out.pixel_mask, ~inside)
    assert bool((out.image[:, out.pixel_mask] == 0).all())


@pytest.mark.parametrize("size", [518, 96])
def test_eval_transform_keeps_the_box_on_the_object(photos, size: int) -> None:
    for image, box, phrase in photos:
        out = EvalTransform(size)(image, box, phrase)
        _check_canvas(out, size)
        w, h = out.meta.placed_size
        assert max(w, h) == size
        assert out.meta.offset == (centre_offset(size - w), centre_offset(size - h))
        assert out.meta.to_image_box(_canvas_xyxy(out, size)) == pytest.approx(box, abs=1e-3)
        sx, sy = out.meta.scale
        dx, dy = out.meta.offset
        expected = [box[0] * sx + dx, box[1] * sy + dy, box[2] * sx + dx, box[3] * sy + dy]
        assert _canvas_xyxy(out, size) == pytest.approx(expected, abs=1e-3)
        assert out.phrase == phrase.lower()
        if size == 518:
            assert _box_correlation(out, size, image, box) > 0.95


def test_centre_offset_is_the_official_rounding() -> None:
    assert [centre_offset(d) for d in (0, 1, 2, 3, 4, 5, 130)] == [0, 0, 1, 1, 2, 2, 65]


def test_forced_flip_mirrors_pixels_box_and_text(photos) -> None:
    size = 518
    flip = TrainTransform(size, replace(STILL, flip_p=1.0), AugmentQuirks.for_mode("clean"))
    for image, box, phrase in photos:
        plain = EvalTransform(size)(image, box, phrase)
        flipped = flip(image, box, phrase)
        _check_canvas(flipped, size)
        assert flipped.meta.flipped and flipped.meta.placed_size == plain.meta.placed_size
        (dx, dy), (w, h) = flipped.meta.offset, flipped.meta.placed_size
        mirrored = plain.image[:, dy : dy + h, dx : dx + w].flip(-1)
        assert torch.allclose(flipped.image[:, dy : dy + h, dx : dx + w], mirrored, atol=0.02)
        # The flipped box is the plain box mirrored inside the placed image.
        px1, py1, px2, py2 = _canvas_xyxy(plain, size)
        mirror = [2 * dx + w - px2, py1, 2 * dx + w - px1, py2]
        assert _canvas_xyxy(flipped, size) == pytest.approx(mirror, abs=1e-3)
        assert flipped.meta.to_image_box(_canvas_xyxy(flipped, size)) == pytest.approx(box, abs=1e-3)
        assert _box_correlation(flipped, size, image, box) > 0.95
        assert flipped.phrase == swap_left_right(phrase.lower(), substring=False)


def test_flip_text_swap_clean_vs_official(photos) -> None:
    image, box, _ = photos[0]
    phrase = "Bright leftmost car on the left, right of the upright pole"
    settings = replace(STILL, flip_p=1.0)
    clean = TrainTransform(96, settings, AugmentQuirks.for_mode("clean"))(image, box, phrase)
    official = TrainTransform(96, settings, AugmentQuirks.for_mode("official"))(image, box, phrase)
    assert clean.phrase == "bright rightmost car on the right, left of the upright pole"
    assert official.phrase == "bleft rightmost car on the right, left of the upleft pole"


def test_swap_and_direction_words() -> None:
    assert swap_left_right("left-hand side, right", substring=False) == "right-hand side, left"
    assert swap_left_right("bright", substring=False) == "bright"
    assert swap_left_right("bright", substring=True) == "bleft"
    assert names_direction("stopped car", substring=True)
    assert not names_direction("stopped car", substring=False)
    assert names_direction("topmost box", substring=False) and names_direction(
        "the middle one", substring=False
    )


def test_forced_crop_keeps_the_box_on_the_object(photos) -> None:
    size = 518
    crop = TrainTransform(size, replace(STILL, crop_p=1.0, translate=True), AugmentQuirks.for_mode("clean"))
    torch.manual_seed(0)
    cropped = 0
    for image, box, phrase in photos:
        if names_direction(phrase.lower(), substring=False):
            continue
        for _ in range(5):
            out = crop(image, box, phrase)
            _check_canvas(out, size)
            ox, oy = out.meta.crop_origin
            w, h = out.meta.placed_size
            sx, sy = out.meta.scale
            region = (ox, oy, ox + w / sx, oy + h / sy)  # the crop in original pixels
            clipped = (
                max(box[0], region[0]),
                max(box[1], region[1]),
                min(box[2], region[2]),
                min(box[3], region[3]),
            )
            # The box is the original box clipped to the crop; its centre stays inside the crop.
            assert out.meta.to_image_box(_canvas_xyxy(out, size)) == pytest.approx(clipped, abs=1e-2)
            centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
            assert region[0] <= centre[0] <= region[2] and region[1] <= centre[1] <= region[3]
            assert _box_correlation(out, size, image, clipped) > 0.9
            cropped += (ox, oy) != (0.0, 0.0) or (w / sx, h / sy) != image.size
    assert cropped > 0


def test_direction_words_never_crop(photos) -> None:
    image, box, _ = photos[0]
    crop = TrainTransform(96, replace(STILL, crop_p=1.0), AugmentQuirks.for_mode("clean"))
    for _ in range(5):
        out = crop(image, box, "the bridge on the left")
        assert out.meta.crop_origin == (0.0, 0.0) and max(out.meta.placed_size) == 96


def test_crop_check_clean_vs_official_swapped() -> None:
    # Box centre (x=300, y=50); crop rows 100..199, columns 250..349: the centre is above the crop.
    assert not crop_accepted((300.0, 50.0), top=100, left=250, height=100, width=100, swapped=False)
    # Official: centre x (300) > top row (100) and centre y (50) > left column (10): accepted.
    assert crop_accepted((300.0, 50.0), top=100, left=10, height=100, width=100, swapped=True)
    assert crop_accepted((300.0, 150.0), top=100, left=250, height=100, width=100, swapped=False)


def test_random_translate_places_the_image_anywhere(photos) -> None:
    image, box, phrase = photos[1]
    shift = TrainTransform(96, replace(STILL, translate=True), AugmentQuirks.for_mode("clean"))
    torch.manual_seed(1)
    offsets = set()
    for _ in range(20):
        out = shift(image, box, phrase)
        _check_canvas(out, 96)
        offsets.add(out.meta.offset)
        assert out.meta.to_image_box(_canvas_xyxy(out, 96)) == pytest.approx(box, abs=1e-2)
    assert len(offsets) > 3


def test_full_train_recipe_outputs(photos) -> None:
    transform = build_transform(True, 96, AugmentSettings(blur_p=0.5), "official")
    assert isinstance(transform, TrainTransform)
    torch.manual_seed(2)
    for image, box, phrase in photos * 3:
        out = transform(image, box, phrase)
        _check_canvas(out, 96)
        assert max(out.meta.placed_size) in transform.long_sides


def test_scales_follow_the_image_size() -> None:
    assert long_side_scales(518, 7, 32) == [518, 486, 454, 422, 390, 358, 326]
    assert long_side_scales(96, 7, 32) == [96, 90, 84, 78, 72, 66, 60]
    t = TrainTransform(96, AugmentSettings(), AugmentQuirks())
    assert t.short_sides == [74, 93, 111] and t.crop_range == (71, 111)


def test_settings_and_quirks() -> None:
    assert AugmentQuirks.for_mode("official") == AugmentQuirks(True, True, True)
    assert AugmentQuirks.for_mode("clean") == AugmentQuirks()
    with pytest.raises(ValueError, match="mode"):
        AugmentQuirks.for_mode("faithful")
    assert AugmentSettings.from_config({"short_sides": [1, 2]}).short_sides == (1, 2)
    with pytest.raises(ValueError, match="unknown augmentation settings"):
        AugmentSettings.from_config({"flip": 0.5})
    assert isinstance(build_transform(True, 96, AugmentSettings(enabled=False), "clean"), EvalTransform)
