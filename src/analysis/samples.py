"""Per-sample test outcomes: which test samples a run got right, kept so that runs can be compared sample by
sample (`src.analysis.statistics`), not only by their per-split accuracy.

A run's results line carries, per test split, its Acc@0.5 outcome of every sample as a bitset (`sample_hits`:
1,000 samples take 168 characters), so that the outcomes travel with the line wherever it is copied. The run
folder also gets every sample's IoU (`test_samples.npz`), for analyses beyond Acc@0.5 (mean IoU, which samples
a method gets wrong).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES_FILE = "test_samples.npz"
ACC_THRESHOLD = 0.5  # Acc@0.5: a prediction is right when its IoU with the target is at least this


@dataclass(frozen=True)
class SplitSamples:
    """One test split's per-sample outcomes: the split's sample count, and each evaluated sample's index in the
    split with its IoU (samples skipped under `data.bad_records=skip` are not evaluated)."""

    size: int
    index: np.ndarray
    iou: np.ndarray


def _bits(mask: np.ndarray) -> str:
    """A boolean vector as base64 text of its packed bits (numpy's `packbits`: bit 7 of byte 0 is element 0)."""
    return base64.b64encode(np.packbits(mask.astype(bool)).tobytes()).decode("ascii")


def _unbits(text: str, size: int) -> np.ndarray:
    """The boolean vector of `size` elements that `_bits` wrote as `text`."""
    packed = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    if len(packed) != (size + 7) // 8:
        raise ValueError(f"a bitset of {len(packed)} bytes cannot hold {size} samples")
    return np.unpackbits(packed, count=size).astype(bool)


def hit_record(samples: SplitSamples) -> dict[str, Any]:
    """A split's outcomes as its results line keeps them: `size`, `hits` (bit i: sample i's IoU >= 0.5) and, when
    some samples were not evaluated, `evaluated` (bit i: sample i was)."""
    evaluated = np.zeros(samples.size, dtype=bool)
    evaluated[samples.index] = True
    hits = np.zeros(samples.size, dtype=bool)
    hits[samples.index] = samples.iou >= ACC_THRESHOLD
    record: dict[str, Any] = {"size": samples.size, "hits": _bits(hits)}
    if not evaluated.all():
        record["evaluated"] = _bits(evaluated)
    return record


def read_hits(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A split's outcomes from its results line: which samples were evaluated and which of them were right."""
    size = int(record["size"])
    evaluated = _unbits(record["evaluated"], size) if "evaluated" in record else np.ones(size, dtype=bool)
    return evaluated, _unbits(record["hits"], size) & evaluated


def write_samples(path: Path, splits: Mapping[str, SplitSamples]) -> Path:
    """Every evaluated sample's index and IoU, per split (`<split>/index`, `<split>/iou`, `<split>/size`), as one
    compressed numpy archive."""
    arrays: dict[str, np.ndarray] = {}
    for name, samples in splits.items():
        arrays |= {f"{name}/index": samples.index.astype(np.int64), f"{name}/iou": samples.iou.astype(np.float32),
                   f"{name}/size": np.asarray(samples.size)}
    np.savez_compressed(path, **arrays)
    return path


def read_samples(path: Path) -> dict[str, SplitSamples]:
    """What `write_samples` wrote."""
    with np.load(path) as archive:
        names = sorted({key.rsplit("/", 1)[0] for key in archive.files})
        return {n: SplitSamples(int(archive[f"{n}/size"]), archive[f"{n}/index"], archive[f"{n}/iou"]) for n in names}
