"""The suite's built-in benchmark: procedurally generated referring scenes.

Each image shows a few (default 3..5) flat-coloured shapes -- circle, square, triangle, diamond,
star, cross -- in saturated colours a person would name (red, green, blue, yellow, purple, orange)
on a muted background (solid, gradient, noise or stripes, all low-saturation so that no background
can be mistaken for an object colour). Images are non-square (default 80..128 px per side) so the
model's padded square canvas really has padding. Objects never touch (their square footprints keep
a gap), so every object's box -- the tight ``x1, y1, x2, y2`` pixel-edge box of its drawn pixels,
``x2``/``y2`` exclusive -- is well defined.

Every scene yields ``refs_per_scene`` referring expressions, each for a *different* target object,
so a model that ignores the phrase cannot do better than ``1 / refs_per_scene`` on any scene and,
averaged over scenes, roughly ``1 / objects`` (see :func:`phrase_blind_baselines`). Expressions
come from four families, each a small predicate over the scene:

* ``np``        -- attributes only: "the red circle", "the blue one", "the triangle".
* ``size``      -- a contrastive size word: "the big red circle", "the small one" (the target
  is clearly the largest/smallest of the objects that match the rest of the phrase).
* ``extreme``   -- a position among the matching objects: "the green shape on the left",
  "the lowest circle", "the object at the top".
* ``relation``  -- a relation to a uniquely described anchor: "the circle left of the blue
  square", "the red one above the triangle", "the star to the right of the yellow one".

An expression is emitted only if its referent set is exactly ``{target}`` under both a strict and a
lenient reading (:func:`resolve`): strict means clear margins (the target is at least
``SPATIAL_MARGIN`` px further in the named direction than any competitor, a relation holds between
the boxes, a size word needs an area ratio of ``SIZE_RATIO``), lenient means the plain comparison
of centres/areas. Agreement of the two readings means no competitor is even borderline. For size,
extreme and relation expressions the attribute part alone must match at least two objects, so the
extra words are really needed. Left/right only ever appear as the separate words ``left`` /
``right`` (never "leftmost"), so a horizontal-flip augmentation that swaps the two words keeps every
phrase true.

On disk (see docs/CONTRACTS.md, "Synthetic benchmark")::

    <cache_dir>/synthetic-<hash>/
        settings.json
        images/<split>_<scene>.png
        splits/synthetic/synthetic_<split>.pth   # split in train / val / test

Split files are ``torch.save``-d lists of TransVG 5-tuples
``(image_file, ann_id, [x1, y1, x2, y2], phrase, attributes)``; ``attributes`` is a JSON string
(``record_attributes(record)`` parses it) holding the whole scene, the target index and the
structured expression, so the uniqueness of every phrase can be re-checked from the split file alone
(``resolve(attributes["expression"], attributes["scene"]["objects"]) == attributes["target"]`` and
``render(attributes["expression"]) == phrase``). A string and not a nested dict because
``torch.load(..., weights_only=True)`` unpickles nested containers slowly: 1.2 s for the 6,000 records
of the default train split against 0.1 s with strings.

Generation is deterministic: the same settings give byte-identical split files and pixel-identical
images; train/val/test draw from disjoint ``numpy`` random streams (one ``SeedSequence`` child per
split). The cache folder is named by a hash of the settings and written atomically (generated into
a temporary sibling, then renamed), so an interrupted run never leaves a half cache and a second
call returns at once.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, ImageDraw

from src.errors import ConfigError

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "EXPRESSION_KINDS",
    "GENERATOR_VERSION",
    "SHAPES",
    "SIZE_RATIO",
    "SPATIAL_MARGIN",
    "SPLITS",
    "SyntheticSettings",
    "ensure_synthetic",
    "generate_scene_records",
    "phrase_blind_baselines",
    "record_attributes",
    "referents",
    "render",
    "resolve",
    "settings_hash",
    "split_path",
]

#: Bump whenever the output for given settings changes (it is part of the cache hash).
#: 2: record attributes stored as JSON strings (images, boxes and phrases as in version 1).
GENERATOR_VERSION = 2

SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Colour name -> base RGB (saturated, far apart in hue; a small jitter is added per object).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "yellow": (245, 215, 20),
    "purple": (150, 45, 200),
    "orange": (250, 135, 10),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise", "stripes")
EXPRESSION_KINDS: tuple[str, ...] = ("np", "size", "extreme", "relation")

#: Strict reading of "on the left"/"highest"...: the target's centre beats every competitor's by this.
SPATIAL_MARGIN = 8.0
#: Strict reading of "big"/"small": the target's box area differs from every competitor's by this factor.
SIZE_RATIO = 1.5

_GENERIC_NOUNS = ("one", "shape", "object")
_SIZE_WORDS = {"big": ("big", "large"), "small": ("small", "little")}
_EXTREME_TEMPLATES = {
    "left": ("the {np} on the left", "the {np} furthest to the left"),
    "right": ("the {np} on the right", "the {np} furthest to the right"),
    "top": ("the {np} at the top", "the highest {np}", "the topmost {np}"),
    "bottom": ("the {np} at the bottom", "the lowest {np}", "the bottom {np}"),
}
_RELATION_TEMPLATES = {
    "left": ("the {np} left of the {anchor}", "the {np} to the left of the {anchor}"),
    "right": ("the {np} right of the {anchor}", "the {np} to the right of the {anchor}"),
    "above": ("the {np} above the {anchor}",),
    "below": ("the {np} below the {anchor}", "the {np} under the {anchor}"),
}

_OBJECT_GAP = 3  # px between the square footprints of two objects
_BORDER = 2  # px between an object's footprint and the image border
_COLOUR_JITTER = 12


@dataclass(frozen=True)
class SyntheticSettings:
    """Everything that determines the generated benchmark (all of it enters the cache hash).

    Attributes:
        seed: master seed; each split draws from its own child stream of it.
        n_train, n_val, n_test: number of *scenes* (images) per split; a split holds
            ``n_<split> * refs_per_scene`` records.
        refs_per_scene: expressions per scene, each for a different target object (at most the
            minimum number of objects).
        width_range, height_range: inclusive image side ranges in px (sampled independently, so
            images are generally non-square).
        objects_range: inclusive range of the number of objects per scene.
        object_size_range: inclusive range of an object's side (its square footprint) in px.
        twin_prob: probability that a scene gets an extra "twin" (same colour and shape as another
            object, usually of another size), which calls for size/position/relation expressions.
        kind_weights: sampling weights of the expression families in ``EXPRESSION_KINDS`` order
            (np, size, extreme, relation); families are tried in a weighted random order and the
            first that uniquely describes the target wins.
        shapes, colours, backgrounds: the vocabularies in use (subsets of ``SHAPES``,
            ``COLOURS`` and ``BACKGROUNDS``).
        png_compress_level: zlib level of the PNG files (1 = fast).
    """

    seed: int = 0
    n_train: int = 3000
    n_val: int = 200
    n_test: int = 500
    refs_per_scene: int = 2
    width_range: tuple[int, int] = (80, 128)
    height_range: tuple[int, int] = (80, 128)
    objects_range: tuple[int, int] = (3, 5)
    object_size_range: tuple[int, int] = (16, 40)
    twin_prob: float = 0.3
    kind_weights: tuple[float, float, float, float] = (0.5, 0.12, 0.18, 0.2)
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    png_compress_level: int = 1

    def __post_init__(self) -> None:
        # Accept lists (e.g. from a YAML/Hydra config): store tuples so the hash is stable.
        for f in fields(self):
            value = getattr(self, f.name)
            if _is_sequence_like(value):
                object.__setattr__(self, f.name, tuple(value))
        for name in ("width_range", "height_range", "objects_range", "object_size_range"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise ConfigError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)}")
        if min(self.n_train, self.n_val, self.n_test) < 0:
            raise ConfigError("split sizes must be >= 0")
        if not 1 <= self.refs_per_scene <= self.objects_range[0]:
            raise ConfigError("refs_per_scene must be in 1..objects_range[0]")
        if self.objects_range[0] < 2:
            raise ConfigError("scenes need at least 2 objects, otherwise the phrase is not needed")
        need = self.object_size_range[1] + 2 * _BORDER
        if min(self.width_range[0], self.height_range[0]) < need:
            raise ConfigError(f"images must be at least {need} px per side for the largest object")
        if len(self.kind_weights) != len(EXPRESSION_KINDS) or min(self.kind_weights) < 0:
            raise ConfigError("kind_weights needs one non-negative weight per expression kind")
        if sum(self.kind_weights) <= 0:
            raise ConfigError("kind_weights must not all be zero")
        for name, allowed in (("shapes", SHAPES), ("colours", tuple(COLOURS)), ("backgrounds", BACKGROUNDS)):
            chosen = getattr(self, name)
            if not chosen or any(c not in allowed for c in chosen) or len(set(chosen)) != len(chosen):
                raise ConfigError(f"{name} must be distinct values from {allowed}, got {chosen}")
        if len(self.shapes) < 2 or len(self.colours) < 2:
            raise ConfigError("need at least two shapes and two colours")
        if not 0.0 <= self.twin_prob <= 1.0:
            raise ConfigError("twin_prob must be in [0, 1]")

    def n_scenes(self, split: str) -> int:
        """Number of scenes of ``split``."""
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


def _is_sequence_like(value: Any) -> bool:
    """True for non-string sequences such as OmegaConf's ListConfig."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def settings_hash(settings: SyntheticSettings) -> str:
    """Short, stable hash of the settings and the generator version (names the cache folder)."""
    payload = json.dumps({"version": GENERATOR_VERSION, **asdict(settings)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def split_path(root: str | Path, split: str) -> Path:
    """Path of a split file inside a generated benchmark folder."""
    return Path(root) / "splits" / "synthetic" / f"synthetic_{split}.pth"


# --------------------------------------------------------------------------------------------------
# Expression semantics
#
# A scene's objects are dicts {"shape": str, "colour": str, "box": [x1, y1, x2, y2]}.
# A noun phrase ("np") is a dict {"size": "" | "big" | "small", "colour": "" | name, "shape": "" | name}.
# An expression is a dict {"kind": one of EXPRESSION_KINDS, "np": np, "direction": str,
# "anchor": np, "forms": [int, int, int]} where "direction" is a key of _EXTREME_TEMPLATES (extreme)
# or _RELATION_TEMPLATES (relation) and "" otherwise, "anchor" is only used by relations, and
# "forms" picks the surface wording (noun, size word, template) -- it never changes the meaning.
# --------------------------------------------------------------------------------------------------


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def _area(box: Sequence[float]) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def _matching(np_: Mapping[str, str], objects: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the objects whose colour and shape agree with the phrase (size ignored)."""
    return [
        i
        for i, o in enumerate(objects)
        if (not np_["colour"] or o["colour"] == np_["colour"])
        and (not np_["shape"] or o["shape"] == np_["shape"])
    ]


def _extreme(values: Sequence[float], candidates: Sequence[int], margin: float | None) -> list[int]:
    """Candidates with the largest value; with a margin only a single winner that clears it by that much."""
    if not candidates:
        return []
    best = max(values[i] for i in candidates)
    winners = [i for i in candidates if values[i] == best]
    if margin is None:
        return winners
    if len(winners) != 1:
        return []
    w = winners[0]
    return winners if all(values[w] - values[j] >= margin for j in candidates if j != w) else []


def _np_referents(np_: Mapping[str, str], objects: Sequence[Mapping[str, Any]], strict: bool) -> list[int]:
    matching = _matching(np_, objects)
    if not np_["size"]:
        return matching
    if len(matching) < 2:  # size words are contrastive: "the big circle" needs another circle
        return []
    areas = [_area(o["box"]) for o in objects]
    big = np_["size"] == "big"
    winners = _extreme(areas if big else [-a for a in areas], matching, None)
    if not strict:
        return winners
    if len(winners) != 1:
        return []
    w = winners[0]
    if big:
        ok = all(areas[w] >= SIZE_RATIO * areas[j] for j in matching if j != w)
    else:
        ok = all(areas[j] >= SIZE_RATIO * areas[w] for j in matching if j != w)
    return winners if ok else []


def _relation_holds(direction: str, box: Sequence[float], anchor: Sequence[float], strict: bool) -> bool:
    """Strict: the boxes are separated in that direction; lenient: the centres are ordered."""
    if strict:
        return {
            "left": box[2] <= anchor[0],
            "right": box[0] >= anchor[2],
            "above": box[3] <= anchor[1],
            "below": box[1] >= anchor[3],
        }[direction]
    (cx, cy), (ax, ay) = _centre(box), _centre(anchor)
    return {"left": cx < ax, "right": cx > ax, "above": cy < ay, "below": cy > ay}[direction]


def referents(
    expression: Mapping[str, Any], objects: Sequence[Mapping[str, Any]], strict: bool = True
) -> list[int]:
    """Indices of the objects the expression refers to (sorted).

    ``strict`` applies the clear-margin reading (``SPATIAL_MARGIN``, ``SIZE_RATIO``, separated boxes),
    otherwise the plain comparison of centres/areas is used. ``objects`` are dicts with "shape",
    "colour" and "box" (x1, y1, x2, y2), as stored in a record's ``attributes["scene"]["objects"]``.
    """
    kind = expression["kind"]
    np_ = expression["np"]
    if kind in ("np", "size"):
        return sorted(_np_referents(np_, objects, strict))
    if kind == "extreme":
        matching = _matching(np_, objects)
        if len(matching) < 2:  # "the circle on the left" presupposes several circles
            return []
        centres = [_centre(o["box"]) for o in objects]
        axis, sign = {"left": (0, -1.0), "right": (0, 1.0), "top": (1, -1.0), "bottom": (1, 1.0)}[
            expression["direction"]
        ]
        values = [sign * c[axis] for c in centres]
        return sorted(_extreme(values, matching, SPATIAL_MARGIN if strict else None))
    if kind == "relation":
        anchor = resolve({"kind": "np", "np": expression["anchor"]}, objects)
        if anchor is None:
            return []
        anchor_box = objects[anchor]["box"]
        return sorted(
            i
            for i in _matching(np_, objects)
            if i != anchor and _relation_holds(expression["direction"], objects[i]["box"], anchor_box, strict)
        )
    raise ValueError(f"unknown expression kind {kind!r}")


def resolve(expression: Mapping[str, Any], objects: Sequence[Mapping[str, Any]]) -> int | None:
    """The single object the expression refers to, or None when it is not unambiguous.

    Unambiguous means the strict and the lenient reading both give the same single object.
    """
    strict = referents(expression, objects, strict=True)
    if len(strict) != 1:
        return None
    return strict[0] if referents(expression, objects, strict=False) == strict else None


def _render_np(np_: Mapping[str, str], noun_form: int, size_form: int, allow_bare_one: bool) -> str:
    words = []
    if np_["size"]:
        options = _SIZE_WORDS[np_["size"]]
        words.append(options[size_form % len(options)])
    if np_["colour"]:
        words.append(np_["colour"])
    if np_["shape"]:
        words.append(np_["shape"])
    else:
        nouns = _GENERIC_NOUNS if (words or allow_bare_one) else _GENERIC_NOUNS[1:]
        words.append(nouns[noun_form % len(nouns)])
    return " ".join(words)


def render(expression: Mapping[str, Any]) -> str:
    """The English phrase of a structured expression (deterministic given its "forms")."""
    noun_form, size_form, template_form = expression["forms"]
    kind = expression["kind"]
    if kind in ("np", "size"):
        return "the " + _render_np(expression["np"], noun_form, size_form, allow_bare_one=False)
    np_text = _render_np(expression["np"], noun_form, size_form, allow_bare_one=True)
    if kind == "extreme":
        templates = _EXTREME_TEMPLATES[expression["direction"]]
        return templates[template_form % len(templates)].format(np=np_text)
    if kind == "relation":
        templates = _RELATION_TEMPLATES[expression["direction"]]
        template = templates[template_form % len(templates)]
        anchor_text = _render_np(expression["anchor"], 0, 0, allow_bare_one=False)
        return template.format(np=np_text, anchor=anchor_text)
    raise ValueError(f"unknown expression kind {kind!r}")


# --------------------------------------------------------------------------------------------------
# Scene generation
# --------------------------------------------------------------------------------------------------


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour (greys, beiges, dull tints) -- never confusable with an object colour."""
    h = rng.random()
    s = rng.uniform(0.0, 0.22)
    v = rng.uniform(0.35, 0.85)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, kind: str, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) uint8 background of the given kind."""
    a = _muted_colour(rng)
    if kind == "solid":
        img = np.broadcast_to(a, (height, width, 3))
    elif kind == "gradient":
        b = _muted_colour(rng)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a[None, None, :] * (1.0 - t[..., None]) + b[None, None, :] * t[..., None]
    elif kind == "noise":
        sigma = rng.uniform(6.0, 16.0)
        img = a[None, None, :] + rng.normal(0.0, sigma, size=(height, width, 1)).astype(np.float32)
    elif kind == "stripes":
        b = _muted_colour(rng)
        period = int(rng.integers(6, 17))
        ys, xs = np.mgrid[0:height, 0:width]
        coord = [xs, ys, xs + ys, xs - ys][int(rng.integers(0, 4))]
        on = ((coord // (period // 2)) % 2).astype(bool)
        img = np.where(on[..., None], a[None, None, :], b[None, None, :])
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_mask(shape: str, side: int) -> Image.Image:
    """A side x side binary mask ('L', 0/255) of the shape filling its square footprint."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    s = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, s, s), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, s, s), fill=255)
    elif shape == "triangle":
        draw.polygon([(s / 2.0, 0), (s, s), (0, s)], fill=255)
    elif shape == "diamond":
        draw.polygon([(s / 2.0, 0), (s, s / 2.0), (s / 2.0, s), (0, s / 2.0)], fill=255)
    elif shape == "star":
        outer, inner = s / 2.0, s / 2.0 * 0.45
        # Centre chosen so that the star's top and bottom tips both touch the footprint.
        cy = outer + (s - outer * (1.0 + np.cos(np.pi / 5.0))) / 2.0
        pts = []
        for k in range(10):
            r = outer if k % 2 == 0 else inner
            a = -np.pi / 2.0 + k * np.pi / 5.0
            pts.append((s / 2.0 + r * np.cos(a), cy + r * np.sin(a)))
        draw.polygon(pts, fill=255)
    elif shape == "cross":
        w = max(2, round(side / 3.0))
        lo = (side - w) // 2
        draw.rectangle((lo, 0, lo + w - 1, s), fill=255)
        draw.rectangle((0, lo, s, lo + w - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _place(
    rng: np.random.Generator, sides: Sequence[int], width: int, height: int, tries: int = 60
) -> list[tuple[int, int]] | None:
    """Top-left corners for square footprints of the given sides that keep a gap; None if it fails."""
    placed: list[tuple[int, int, int]] = []
    for side in sides:
        for _ in range(tries):
            x = int(rng.integers(_BORDER, width - side - _BORDER + 1))
            y = int(rng.integers(_BORDER, height - side - _BORDER + 1))
            if all(
                x + side + _OBJECT_GAP <= px
                or px + ps + _OBJECT_GAP <= x
                or y + side + _OBJECT_GAP <= py
                or py + ps + _OBJECT_GAP <= y
                for px, py, ps in placed
            ):
                placed.append((x, y, side))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _sample_layout(
    rng: np.random.Generator, st: SyntheticSettings
) -> tuple[int, int, list[dict[str, Any]], list[int], list[tuple[int, int]]]:
    """Image size and object attributes/sides/corners (no pixels yet)."""
    lo, hi = st.object_size_range
    while True:
        width = int(rng.integers(st.width_range[0], st.width_range[1] + 1))
        height = int(rng.integers(st.height_range[0], st.height_range[1] + 1))
        n = int(rng.integers(st.objects_range[0], st.objects_range[1] + 1))
        objs = [
            {
                "shape": st.shapes[int(rng.integers(len(st.shapes)))],
                "colour": st.colours[int(rng.integers(len(st.colours)))],
            }
            for _ in range(n)
        ]
        if n >= 2 and rng.random() < st.twin_prob:
            i, j = (int(v) for v in rng.choice(n, size=2, replace=False))
            objs[j] = dict(objs[i])
        sides = [int(rng.integers(lo, hi + 1)) for _ in range(n)]
        # Place big objects first: far fewer failed placements.
        order = sorted(range(n), key=lambda k: -sides[k])
        corners_sorted = _place(rng, [sides[k] for k in order], width, height)
        if corners_sorted is None:
            continue
        corners: list[tuple[int, int]] = [(0, 0)] * n
        for k, c in zip(order, corners_sorted, strict=True):
            corners[k] = c
        return width, height, objs, sides, corners


def _candidates(
    kind: str, target: int, objects: Sequence[Mapping[str, Any]], rng: np.random.Generator
) -> Iterator[dict[str, Any]]:
    """Expressions of one family that might describe the target, in a random order."""
    t = objects[target]
    descs = [
        {"size": "", "colour": t["colour"], "shape": t["shape"]},
        {"size": "", "colour": t["colour"], "shape": ""},
        {"size": "", "colour": "", "shape": t["shape"]},
    ]
    if kind != "np":
        descs.append({"size": "", "colour": "", "shape": ""})
    order = rng.permutation(len(descs))
    if kind == "np":
        for k in order:
            yield {"kind": "np", "np": descs[k], "direction": "", "anchor": {}}
    elif kind == "size":
        for k in order:
            for word in ("big", "small"):
                yield {"kind": "size", "np": {**descs[k], "size": word}, "direction": "", "anchor": {}}
    elif kind == "extreme":
        directions = list(_EXTREME_TEMPLATES)
        for k in order:
            for d in rng.permutation(len(directions)):
                yield {"kind": "extreme", "np": descs[k], "direction": directions[d], "anchor": {}}
    elif kind == "relation":
        directions = list(_RELATION_TEMPLATES)
        others = [i for i in range(len(objects)) if i != target]
        for k in order:
            for a in rng.permutation(len(others)):
                ao = objects[others[a]]
                anchors = [
                    {"size": "", "colour": ao["colour"], "shape": ao["shape"]},
                    {"size": "", "colour": "", "shape": ao["shape"]},
                    {"size": "", "colour": ao["colour"], "shape": ""},
                ]
                for b in rng.permutation(len(anchors)):
                    for d in rng.permutation(len(directions)):
                        yield {
                            "kind": "relation",
                            "np": descs[k],
                            "direction": directions[d],
                            "anchor": anchors[b],
                        }


def _needed(expr: Mapping[str, Any], target: int, objects: Sequence[Mapping[str, Any]]) -> bool:
    """For size/extreme/relation: the attribute words alone must not already single out the target."""
    if expr["kind"] == "np":
        return True
    base = {**expr["np"], "size": ""}
    matching = _matching(base, objects)
    if expr["kind"] == "relation":
        anchor = resolve({"kind": "np", "np": expr["anchor"]}, objects)
        matching = [i for i in matching if i != anchor]
    return len(matching) >= 2


def _describe(
    target: int, objects: Sequence[Mapping[str, Any]], st: SyntheticSettings, rng: np.random.Generator
) -> dict[str, Any] | None:
    """A structured expression whose only referent is ``target``, or None."""
    weights = np.asarray(st.kind_weights, dtype=np.float64)
    kinds = [k for k, w in zip(EXPRESSION_KINDS, weights, strict=True) if w > 0]
    p = weights[weights > 0] / weights[weights > 0].sum()
    # Weighted random order without replacement (Efraimidis-Spirakis keys).
    keys = rng.random(len(kinds)) ** (1.0 / p)
    for idx in np.argsort(-keys, kind="stable"):
        for expr in _candidates(kinds[idx], target, objects, rng):
            if resolve(expr, objects) == target and _needed(expr, target, objects):
                expr["forms"] = [int(v) for v in rng.integers(0, 6, size=3)]
                return expr
    return None


def _draw_scene(
    rng: np.random.Generator,
    st: SyntheticSettings,
    width: int,
    height: int,
    objs: list[dict[str, Any]],
    sides: Sequence[int],
    corners: Sequence[tuple[int, int]],
) -> tuple[Image.Image, str]:
    kind = st.backgrounds[int(rng.integers(len(st.backgrounds)))]
    image = Image.fromarray(_background(rng, kind, width, height), mode="RGB")
    for o, side, (x, y) in zip(objs, sides, corners, strict=True):
        base = np.asarray(COLOURS[o["colour"]], dtype=np.int64)
        rgb = np.clip(base + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3), 0, 255)
        mask = _shape_mask(o["shape"], side)
        image.paste(tuple(int(v) for v in rgb), (x, y, x + side, y + side), mask)
        bx1, by1, bx2, by2 = mask.getbbox()
        o["box"] = [float(x + bx1), float(y + by1), float(x + bx2), float(y + by2)]
    return image, kind


def generate_scene_records(
    rng: np.random.Generator, st: SyntheticSettings, image_file: str, first_ann_id: int
) -> tuple[Image.Image, list[tuple[str, int, list[float], str, dict[str, Any]]]]:
    """One scene (image) and its ``refs_per_scene`` records, each for a different target."""
    while True:
        width, height, objs, sides, corners = _sample_layout(rng, st)
        image, background = _draw_scene(rng, st, width, height, objs, sides, corners)
        targets = [int(t) for t in rng.permutation(len(objs))[: st.refs_per_scene]]
        exprs = [_describe(t, objs, st, rng) for t in targets]
        if all(e is not None for e in exprs):
            break
    scene = {"width": width, "height": height, "background": background, "objects": objs}
    records = []
    for k, (t, e) in enumerate(zip(targets, exprs, strict=True)):
        assert e is not None
        attributes = json.dumps({"scene": scene, "target": t, "kind": e["kind"], "expression": e})
        records.append((image_file, first_ann_id + k, list(objs[t]["box"]), render(e), attributes))
    return image, records


def record_attributes(record: Sequence[Any]) -> dict[str, Any]:
    """The attributes of a generated record (scene, target, kind, expression), parsed from its JSON string."""
    return json.loads(record[4])


def _generate_split(st: SyntheticSettings, split: str, root: Path) -> None:
    split_idx = SPLITS.index(split)
    rng = np.random.default_rng(np.random.SeedSequence(st.seed).spawn(len(SPLITS))[split_idx])
    records: list[tuple[str, int, list[float], str, str]] = []
    images = root / "images"
    # PNG encoding releases the GIL: a second thread writes the images while this one draws the next
    with ThreadPoolExecutor(max_workers=1) as writer:
        saved = []
        for i in range(st.n_scenes(split)):
            file = f"{split}_{i:06d}.png"
            ann0 = split_idx * 10_000_000 + i * st.refs_per_scene
            image, recs = generate_scene_records(rng, st, file, ann0)
            saved.append(writer.submit(image.save, images / file, format="PNG", compress_level=st.png_compress_level))
            records.extend(recs)
        for future in saved:
            future.result()  # re-raises a failed write
    torch.save(records, split_path(root, split))


def ensure_synthetic(cache_dir: str | Path, **settings: Any) -> Path:
    """Generate the benchmark for these settings once and return its folder.

    Keyword arguments are ``SyntheticSettings`` fields (unknown names raise ``TypeError``). The
    folder ``<cache_dir>/synthetic-<settings_hash>`` is built in a temporary sibling and renamed
    into place, so it either exists complete or not at all; if it exists it is returned at once.
    """
    st = SyntheticSettings(**settings)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"synthetic-{settings_hash(st)}"
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(final.with_name(final.name + ".lock")):  # one process generates, concurrent ones wait
        if final.is_dir():
            return final
        _generate(st, final)
    return final


def _generate(st: SyntheticSettings, final: Path) -> None:
    """Write the benchmark into a temporary sibling of `final` and rename it into place."""
    cache_dir = final.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        (tmp / "images").mkdir()
        (tmp / "splits" / "synthetic").mkdir(parents=True)
        for split in SPLITS:
            _generate_split(st, split, tmp)
        meta = {"version": GENERATOR_VERSION, "hash": settings_hash(st), "settings": asdict(st)}
        (tmp / "settings.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a concurrent run may have won the race; anything else is an error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Chance level
# --------------------------------------------------------------------------------------------------


def phrase_blind_baselines(
    records: Sequence[tuple[str, int, Sequence[float], str, str]],
) -> dict[str, float]:
    """Accuracy of simple phrase-blind rules that pick one object per image (1.0 = always the target).

    Rules: the largest object, the most central object, the left/right/top/bottom-most object, and
    ``uniform`` -- the expected accuracy of a uniformly random object (mean of 1 / #objects). Since
    the rules pick an exact object box, their accuracy equals their Acc@0.5.
    """
    if not records:
        return {}
    hits: dict[str, float] = {
        k: 0.0 for k in ("largest", "smallest", "central", "left", "right", "top", "bottom", "uniform")
    }
    for rec in records:
        attrs = record_attributes(rec)
        scene, target = attrs["scene"], attrs["target"]
        boxes = [o["box"] for o in scene["objects"]]
        centres = [_centre(b) for b in boxes]
        cx0, cy0 = scene["width"] / 2.0, scene["height"] / 2.0
        picks = {
            "largest": max(range(len(boxes)), key=lambda i: _area(boxes[i])),
            "smallest": min(range(len(boxes)), key=lambda i: _area(boxes[i])),
            "central": min(
                range(len(boxes)), key=lambda i: (centres[i][0] - cx0) ** 2 + (centres[i][1] - cy0) ** 2
            ),
            "left": min(range(len(boxes)), key=lambda i: centres[i][0]),
            "right": max(range(len(boxes)), key=lambda i: centres[i][0]),
            "top": min(range(len(boxes)), key=lambda i: centres[i][1]),
            "bottom": max(range(len(boxes)), key=lambda i: centres[i][1]),
        }
        for name, pick in picks.items():
            hits[name] += float(pick == target)
        hits["uniform"] += 1.0 / len(boxes)
    return {k: v / len(records) for k, v in hits.items()}
