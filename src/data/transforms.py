"""Train and eval transforms: image + box + phrase -> padded S x S canvas, pad mask, normalised cxcywh box.

The official TRAIN recipe (mapper-spec §2.4) and EVAL recipe, built on torchvision.transforms.v2
functionals and `tv_tensors.BoundingBoxes`; written by hand are only the parts v2 lacks: the
direction-word-aware choice between resize-only and resize+crop+resize, the box-aware crop, the
text-aware flip and the random placement on the canvas. Geometry scales with S: sizes given at the
official S = 518 (long sides 518 - 32k, short sides 400/500/600, crop 384..600) are multiplied by S/518.
The official quirks (§6.8) are named switches in `src.quirks.AugmentQuirks`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from src.config import checked_fields
from src.quirks import AugmentQuirks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REFERENCE_SIZE = 518  # the official image size; the official pixel sizes below are given at this size

_DIRECTION_SUBSTRINGS = ("left", "right", "top", "bottom", "middle")
_DIRECTION_WORD = re.compile(r"\b(?:left|right|top|bottom|middle)(?:most)?\b")
_LEFT_RIGHT_WORD = re.compile(r"\b(left|right)(most)?\b")
_SWAP_PLACEHOLDER = "\x00"




@dataclass(frozen=True)
class AugmentSettings:
    """Train augmentation settings; pixel sizes are given at S = 518 and scaled by S/518 (None = official)."""

    enabled: bool = True  # False: the train split gets the eval transform
    crop_p: float = 0.5  # P(resize + crop + resize) when the phrase names no direction (aug_crop)
    num_scales: int = 7  # long sides S - k * scale_step * S/518, k < num_scales (aug_scale; 1 = off)
    scale_step: int = 32
    short_sides: tuple[int, ...] = (400, 500, 600)  # short side before the crop
    crop_min: int = 384  # crop width/height range
    crop_max: int = 600
    crop_tries: int = 20  # tries before giving up on the crop
    jitter_p: float = 0.8  # colour jitter probability (always on in the official code)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    blur_p: float = 0.0  # Gaussian blur probability (0.5 with the official --aug_blur)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5  # horizontal flip probability, with left/right swapped in the phrase
    translate: bool = True  # random placement on the canvas (aug_translate); False = centred

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> AugmentSettings:
        """Build from a config mapping, turning lists into tuples and rejecting unknown keys."""
        config = checked_fields(cls, config, "augmentation")
        return cls(
            **{
                k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
                for k, v in config.items()
            }
        )


@dataclass(frozen=True)
class CanvasMeta:
    """Where the original image landed on the canvas, to map boxes back to original pixels."""

    scale: tuple[float, float]  # canvas pixels per original pixel, (x, y)
    offset: tuple[int, int]  # top-left of the placed image on the canvas, (x, y)
    placed_size: tuple[int, int]  # size of the placed image on the canvas, (w, h)
    crop_origin: tuple[float, float] = (0.0, 0.0)  # top-left of the crop in original pixels, (x, y)
    flipped: bool = False

    def to_image_box(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """Map an xyxy box in canvas pixels back to xyxy pixels of the original image."""
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = x1 - self.offset[0], x2 - self.offset[0]
        y1, y2 = y1 - self.offset[1], y2 - self.offset[1]
        if self.flipped:
            x1, x2 = self.placed_size[0] - x2, self.placed_size[0] - x1
        (sx, sy), (cx, cy) = self.scale, self.crop_origin
        return (x1 / sx + cx, y1 / sy + cy, x2 / sx + cx, y2 / sy + cy)


@dataclass
class Transformed:
    """One transformed sample: normalised canvas, pad mask (True = pad), cxcywh/S box, phrase, meta."""

    image: torch.Tensor
    pixel_mask: torch.Tensor
    box: torch.Tensor
    phrase: str
    meta: CanvasMeta


# ------------------------------------------------------------------------------------------- phrases


def names_direction(phrase: str, substring: bool) -> bool:
    """Whether a lower-cased phrase names a direction (then the official recipe never crops)."""
    if substring:
        return any(word in phrase for word in _DIRECTION_SUBSTRINGS)
    return _DIRECTION_WORD.search(phrase) is not None


def swap_left_right(phrase: str, substring: bool) -> str:
    """Swap left and right in a lower-cased phrase: as substrings (official) or as whole words (clean)."""
    if substring:
        swapped = phrase.replace("right", _SWAP_PLACEHOLDER).replace("left", "right")
        return swapped.replace(_SWAP_PLACEHOLDER, "left")
    return _LEFT_RIGHT_WORD.sub(lambda m: ("right" if m[1] == "left" else "left") + (m[2] or ""), phrase)


# ------------------------------------------------------------------------------------------- geometry


def at_size(pixels: float, image_size: int) -> int:
    """Scale a pixel size given at the official S = 518 to image_size."""
    return max(1, round(pixels * image_size / REFERENCE_SIZE))


def long_side_scales(image_size: int, num_scales: int, scale_step: int) -> list[int]:
    """The long sides of the scale augmentation: S - k * step (step scaled to S), k = 0..num_scales-1."""
    sides = [image_size - round(k * scale_step * image_size / REFERENCE_SIZE) for k in range(num_scales)]
    if min(sides) < 1:
        raise ValueError(
            f"num_scales={num_scales} with scale_step={scale_step} leaves no image at S={image_size}"
        )
    return sides


def _choice(options: Sequence[int]) -> int:
    """Pick one option uniformly with torch's RNG (seeded per DataLoader worker)."""
    return options[int(torch.randint(len(options), ()))]


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high], both inclusive, with torch's RNG."""
    return int(torch.randint(low, high + 1, ()))


def _size_for_long_side(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(h, w) with the long side equal to long_side and the aspect ratio kept."""
    if width >= height:
        return max(1, round(height * long_side / width)), long_side
    return long_side, max(1, round(width * long_side / height))


def _size_for_short_side(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side equal to short_side and the aspect ratio kept."""
    if width <= height:
        return max(1, round(height * short_side / width)), short_side
    return short_side, max(1, round(width * short_side / height))


class _Geometry:
    """An image and its box moving through resizes, a crop and a flip, tracking the map to the original."""

    def __init__(self, image: Image.Image, box: Sequence[float]) -> None:
        """Wrap a PIL image and an xyxy pixel box as tv_tensors."""
        self.image = F.to_image(image)
        height, width = self.image.shape[-2:]
        self.box = tv_tensors.BoundingBoxes(
            [list(map(float, box))], format="XYXY", canvas_size=(height, width), dtype=torch.float32
        )
        self.scale = (1.0, 1.0)
        self.crop_origin = (0.0, 0.0)
        self.flipped = False

    @property
    def size(self) -> tuple[int, int]:
        """Current (width, height)."""
        height, width = self.image.shape[-2:]
        return int(width), int(height)

    def resize(self, height: int, width: int) -> None:
        """Resize image and box to (height, width)."""
        old_w, old_h = self.size
        self.image = F.resize(self.image, [height, width], antialias=True)
        self.box = F.resize(self.box, [height, width])
        self.scale = (self.scale[0] * width / old_w, self.scale[1] * height / old_h)

    def resize_long_side(self, long_side: int) -> None:
        """Resize so that the long side equals long_side."""
        self.resize(*_size_for_long_side(*self.size, long_side))

    def crop(self, top: int, left: int, height: int, width: int) -> None:
        """Crop image and box (the box is clipped to the crop, as in the official recipe)."""
        self.image = F.crop(self.image, top, left, height, width)
        self.box = F.crop(self.box, top, left, height, width)
        self.crop_origin = (
            self.crop_origin[0] + left / self.scale[0],
            self.crop_origin[1] + top / self.scale[1],
        )

    def hflip(self) -> None:
        """Mirror image and box horizontally."""
        self.image = F.horizontal_flip(self.image)
        self.box = F.horizontal_flip(self.box)
        self.flipped = True

    def box_centre(self) -> tuple[float, float]:
        """Centre (x, y) of the box."""
        x1, y1, x2, y2 = self.box[0].tolist()
        return (x1 + x2) / 2, (y1 + y2) / 2


def _place_on_canvas(geo: _Geometry, phrase: str, image_size: int, offset: tuple[int, int]) -> Transformed:
    """Normalise, pad to S x S at offset (padding 0 after normalisation), and build mask and cxcywh/S box."""
    width, height = geo.size
    if width > image_size or height > image_size:
        raise ValueError(f"image of size {width}x{height} does not fit the {image_size}x{image_size} canvas")
    dx, dy = offset
    padding = [dx, dy, image_size - width - dx, image_size - height - dy]
    image = F.normalize(F.to_dtype(geo.image, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
    image = F.pad(image, padding, fill=0.0)
    box = F.convert_bounding_box_format(F.pad(geo.box, padding), new_format="CXCYWH")
    mask = torch.ones(image_size, image_size, dtype=torch.bool)
    mask[dy : dy + height, dx : dx + width] = False
    meta = CanvasMeta(geo.scale, (dx, dy), (width, height), geo.crop_origin, geo.flipped)
    return Transformed(
        image.as_subclass(torch.Tensor), mask, box[0].as_subclass(torch.Tensor) / image_size, phrase, meta
    )


def crop_accepted(
    centre: tuple[float, float], top: int, left: int, height: int, width: int, swapped: bool
) -> bool:
    """Crop acceptance: the box centre lies inside the crop, or (swapped) the official i/j-swapped test."""
    cx, cy = centre
    if swapped:
        return cx > top and cy > left
    return left <= cx < left + width and top <= cy < top + height


def centre_offset(free: int) -> int:
    """The official centring offset for `free` spare pixels: round(free / 2 - 0.1)."""
    return round(free / 2 - 0.1)


# ------------------------------------------------------------------------------------------- transforms


class EvalTransform:
    """Eval recipe: resize the long side to S, normalise, centre on the S x S canvas."""

    def __init__(self, image_size: int) -> None:
        """Set the canvas size S."""
        self.image_size = image_size

    def __call__(self, image: Image.Image, box: Sequence[float], phrase: str) -> Transformed:
        """Transform one (PIL image, xyxy pixel box, phrase) sample; the phrase is lower-cased."""
        geo = _Geometry(image, box)
        geo.resize_long_side(self.image_size)
        width, height = geo.size
        offset = (centre_offset(self.image_size - width), centre_offset(self.image_size - height))
        return _place_on_canvas(geo, phrase.lower(), self.image_size, offset)


class TrainTransform:
    """Official train recipe (§2.4): scale/crop select, colour jitter, blur, text-aware flip, translate."""

    def __init__(self, image_size: int, settings: AugmentSettings, quirks: AugmentQuirks) -> None:
        """Derive the size lists from S and build the photometric v2 transforms."""
        self.image_size = image_size
        self.settings = settings
        self.quirks = quirks
        self.long_sides = long_side_scales(image_size, settings.num_scales, settings.scale_step)
        self.short_sides = [at_size(s, image_size) for s in settings.short_sides]
        self.crop_range = (at_size(settings.crop_min, image_size), at_size(settings.crop_max, image_size))
        jitter = v2.ColorJitter(settings.brightness, settings.contrast, settings.saturation)
        self.jitter = v2.RandomApply([jitter], p=settings.jitter_p)
        sigma_max = max(settings.blur_sigma)
        blur = v2.GaussianBlur(kernel_size=2 * math.ceil(3 * sigma_max) + 1, sigma=settings.blur_sigma)
        self.blur = v2.RandomApply([blur], p=settings.blur_p)

    def __call__(self, image: Image.Image, box: Sequence[float], phrase: str) -> Transformed:
        """Transform one (PIL image, xyxy pixel box, phrase) sample; the phrase is lower-cased first."""
        phrase = phrase.lower()
        geo = _Geometry(image, box)
        no_crop = names_direction(phrase, self.quirks.substring_direction_test)
        if not no_crop and torch.rand(()) < self.settings.crop_p:
            geo.resize(*_size_for_short_side(*geo.size, _choice(self.short_sides)))
            self._random_crop(geo)
        geo.resize_long_side(_choice(self.long_sides))
        geo.image = self.blur(self.jitter(geo.image))
        if torch.rand(()) < self.settings.flip_p:
            geo.hflip()
            phrase = swap_left_right(phrase, self.quirks.substring_flip_swap)
        return _place_on_canvas(geo, phrase, self.image_size, self._offset(*geo.size))

    def _random_crop(self, geo: _Geometry) -> None:
        """Random-size crop (sides in the crop range), up to crop_tries tries; no crop if none is accepted."""
        width, height = geo.size
        low, high = self.crop_range
        for _ in range(self.settings.crop_tries):
            crop_w = _randint(min(low, width), min(width, high))
            crop_h = _randint(min(low, height), min(height, high))
            top, left = _randint(0, height - crop_h), _randint(0, width - crop_w)
            if crop_accepted(geo.box_centre(), top, left, crop_h, crop_w, self.quirks.swapped_crop_check):
                geo.crop(top, left, crop_h, crop_w)
                return

    def _offset(self, width: int, height: int) -> tuple[int, int]:
        """Uniformly random placement on the canvas (translate), else the centred one."""
        if not self.settings.translate:
            return centre_offset(self.image_size - width), centre_offset(self.image_size - height)
        return _randint(0, self.image_size - width), _randint(0, self.image_size - height)


def build_transform(
    train: bool, image_size: int, settings: AugmentSettings, mode: str, quirks: Mapping[str, Any] | None = None
) -> TrainTransform | EvalTransform:
    """The train recipe (when train and augmentation is enabled) or the eval recipe; `quirks` sets
    single augmentation quirks against the mode's defaults."""
    if train and settings.enabled:
        return TrainTransform(image_size, settings, AugmentQuirks.resolve(mode, quirks))
    return EvalTransform(image_size)
