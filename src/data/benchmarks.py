"""Registry of the benchmarks the suite reads: splits, split-file layout, box format and image folder.

Facts from mapper-spec §4 and the TransVG "data indices" tarball: split files live at
`<split_root>/<key>/<key>_<split>.pth`; images live under a data root (`ln_data` in TransVG/MaPPER).
A benchmark config (`conf/data/<name>.yaml`) reads one of them by its key (`dataset: unc`); a user's own
benchmark joins with `register_benchmark`, from a module in their `plugins` (docs/EXTENDING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from src.errors import ConfigError

BoxFormat = Literal["xyxy", "xywh"]
BOX_FORMATS: tuple[str, ...] = ("xyxy", "xywh")
COCO_IMAGES = "other/images/mscoco/images/train2014"
# MaPPER's code reads COCO images from here, while TransVG's download script unzips to COCO_IMAGES.
MAPPER_COCO_IMAGES = "other/images/train2014"


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the readers and the data doctor need to know about one benchmark key."""

    key: str
    splits: tuple[str, ...]
    # Box format inside the split file; None = declared per file/setting (custom JSONL).
    box_format: BoxFormat | None
    # "5-tuple": (image, id, box, phrase, attributes); "3-tuple": (image, box, phrase); "jsonl": JSON Lines.
    record_shape: Literal["5-tuple", "3-tuple", "jsonl"]
    # Image folder relative to the data root ("" = set image_root explicitly).
    image_dir: str
    # (REFER dataset name, splitBy) when the benchmark also exists in the original REFER format.
    refer: tuple[str, str] | None = None
    # A benchmark made by code rather than read from disk: `generator(cache_dir, **settings)` makes it once (cached
    # by its settings, `data.synthetic`) and returns its folder, holding `splits/` and `image_dir`. None: read in place.
    generator: Callable[..., str | Path] | None = None
    # Whether random-init backbones first pretrain on a separate corpus the generator draws (src/pretraining).
    pretrains_backbones: bool = False

    def split_file(self, split_root: str | Path, split: str) -> Path:
        """Path of one split's file under split_root (TransVG layout, or `<split>.jsonl` for custom data)."""
        if self.record_shape == "jsonl":
            return Path(split_root) / f"{split}.jsonl"
        return Path(split_root) / self.key / f"{self.key}_{split}.pth"

    def check_split(self, split: str) -> None:
        """Fail early, naming the benchmark, when a split is not one it has."""
        if self.splits and split not in self.splits:
            raise ConfigError(
                f"benchmark {self.key!r} has no split {split!r}; its splits are {list(self.splits)}"
            )


_COCO_SPLITS = ("train", "val", "testA", "testB", "trainval")

def generate_synthetic(cache_dir: str | Path, **settings) -> Path:
    """The built-in synthetic benchmark's generator (`src.data.synthetic`, imported when first used)."""
    from src.data.synthetic import ensure_synthetic

    return Path(ensure_synthetic(cache_dir, **settings))


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.key: spec
    for spec in (
        BenchmarkSpec("unc", _COCO_SPLITS, "xywh", "5-tuple", COCO_IMAGES, ("refcoco", "unc")),
        BenchmarkSpec("unc+", _COCO_SPLITS, "xywh", "5-tuple", COCO_IMAGES, ("refcoco+", "unc")),
        BenchmarkSpec("gref", ("train", "val"), "xywh", "5-tuple", COCO_IMAGES, ("refcocog", "google")),
        BenchmarkSpec(
            "gref_umd", ("train", "val", "test"), "xywh", "5-tuple", COCO_IMAGES, ("refcocog", "umd")
        ),
        BenchmarkSpec("referit", ("train", "val", "test", "trainval"), "xyxy", "5-tuple", "referit/images"),
        BenchmarkSpec("flickr", ("train", "val", "test"), "xyxy", "3-tuple", "Flickr30k/flickr30k_images"),
        BenchmarkSpec("synthetic", ("train", "val", "test"), "xyxy", "5-tuple", "images",
                      generator=generate_synthetic, pretrains_backbones=True),
        # Custom data: any split name, one `<split>.jsonl` per split, box format declared by the user.
        BenchmarkSpec("custom", (), None, "jsonl", ""),
    )
}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    """Make `spec` readable as `dataset: <spec.key>`; a key already registered with other facts is refused."""
    taken = BENCHMARKS.get(spec.key)
    if taken is not None and taken != spec:
        raise ConfigError(f"benchmark key {spec.key!r} is registered twice, with different facts: {taken} and {spec}")
    BENCHMARKS[spec.key] = spec
    return spec


def get_benchmark(key: str) -> BenchmarkSpec:
    """Look up a benchmark key, listing the known keys when it is unknown."""
    try:
        return BENCHMARKS[key]
    except KeyError:
        raise ConfigError(f"unknown benchmark {key!r}; known: {sorted(BENCHMARKS)}") from None
