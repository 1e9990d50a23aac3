"""The demo page's examples: the real photos of `../shared/data/photos` when that folder is beside the checkout,
else scenes of the built-in synthetic benchmark (its first test scenes, generated into the cache)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from src.config import compose
from src.data.readers import read_transvg
from src.data.synthetic import ensure_synthetic, split_path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARED_PHOTOS = PROJECT_ROOT.parent / "shared" / "data" / "photos"
SYNTHETIC_SCENES = 4  # two expressions each


@dataclass(frozen=True)
class Example:
    """An image with a phrase and the box it refers to (x1 y1 x2 y2 pixels), shown under the page's inputs."""

    image: Path
    phrase: str
    box: tuple[float, float, float, float]

    def row(self) -> list[str]:
        """The page's inputs for this example: image, phrase, true box as the box field reads it."""
        return [str(self.image), self.phrase, " ".join(f"{v:g}" for v in self.box)]


def photo_examples(folder: Path) -> list[Example]:
    """The photos' expressions from `annotations.json` (records `[image, id, [x1, y1, x2, y2], phrase, split]`);
    malformed records are left out with a warning (the file is data, never trusted to be well formed)."""
    where = folder / "annotations.json"
    try:
        records = json.loads(where.read_text())["records"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s: no usable records (%s)", where, err)
        return []
    examples = []
    for i, record in enumerate(records if isinstance(records, list) else []):
        try:
            image, _, box, phrase, _ = record
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            log.warning("%s: record %d is not [image, id, [x1, y1, x2, y2], phrase, split]: left out", where, i)
            continue
        if isinstance(image, str) and isinstance(phrase, str) and all(map(math.isfinite, (x1, y1, x2, y2))) \
                and (folder / Path(image).name).is_file():
            examples.append(Example(folder / Path(image).name, phrase, (x1, y1, x2, y2)))
    return examples


def synthetic_examples(scenes: int = SYNTHETIC_SCENES) -> list[Example]:
    """The first `scenes` test scenes of the default synthetic benchmark (the same generator, seed and settings,
    so the same pictures and phrases as its test split), generated into the cache on first use."""
    cfg = compose()
    settings = {**cfg.data.synthetic, "n_train": 0, "n_val": 0, "n_test": scenes}
    root = ensure_synthetic(cfg.paths.cache_dir, **settings)
    return [Example(root / "images" / r.image, r.phrase, r.box) for r in read_transvg(split_path(root, "test"), "xyxy")]


def default_examples() -> list[Example]:
    """The shared photos when they are there and readable, else synthetic scenes."""
    return (photo_examples(SHARED_PHOTOS) if SHARED_PHOTOS.is_dir() else []) or synthetic_examples()
