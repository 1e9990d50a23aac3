"""Map-style dataset over Records (image file + xyxy box + phrase) and the collate that builds a Batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from src.data.records import Record
from src.data.tokenizers import Tokenizer
from src.data.transforms import Transformed

TransformFn = Callable[[Image.Image, Sequence[float], str], Transformed]


class ImageReadError(OSError):
    """An image that cannot be opened or decoded; the message names the file and the record."""


def load_image(path: Path, where: str) -> Image.Image:
    """Open an image as RGB, with an error naming the file and the record that needs it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageReadError(f"{where}: cannot read image {path}: {err}") from None


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation without fixed points: records on one random cycle take the next one's phrase."""
    if n < 2:
        raise ValueError(f"a phrase permutation needs at least 2 records, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    source = [0] * n
    for k, index in enumerate(order):
        source[index] = order[(k + 1) % n]
    return source


class RecordDataset(Dataset):
    """Records -> per-sample dicts of the Batch contract (plus `index`), transformed and tokenised.

    With phrase_permutation_seed set, every image is paired with the phrase of another record (a seeded
    derangement) while keeping its own box: accuracy on it measures how much a model relies on language.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_root: str | Path,
        transform: TransformFn,
        bert_tok: Tokenizer,
        clip_tok: Tokenizer,
        max_query_len: int,
        phrase_permutation_seed: int | None = None,
    ) -> None:
        """Keep the records and helpers; draw the phrase permutation once if a seed is given."""
        self.records = list(records)
        self.image_root = Path(image_root)
        self.transform = transform
        self.bert_tok = bert_tok
        self.clip_tok = clip_tok
        self.max_query_len = max_query_len
        self.phrase_source = (
            derangement(len(self.records), phrase_permutation_seed)
            if phrase_permutation_seed is not None
            else None
        )

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    def phrase_of(self, index: int) -> str:
        """The phrase sample `index` is paired with (its own, or another record's when permuted)."""
        source = index if self.phrase_source is None else self.phrase_source[index]
        return self.records[source].phrase

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load, transform and tokenise one record."""
        record = self.records[index]
        image = load_image(self.image_root / record.image, f"record {index} ({record.phrase!r})")
        out = self.transform(image, record.box, self.phrase_of(index))
        text_ids, text_mask = self.bert_tok([out.phrase], self.max_query_len)
        prior_ids, prior_mask = self.clip_tok([out.phrase], self.max_query_len)
        return {
            "image": out.image,
            "pixel_mask": out.pixel_mask,
            "text_ids": text_ids[0],
            "text_mask": text_mask[0],
            "prior_ids": prior_ids[0],
            "prior_mask": prior_mask[0],
            "box": out.box,
            "phrase": out.phrase,
            "image_file": record.image,
            "index": index,
        }


class CachedSamples(Dataset):
    """A dataset's samples computed once, eagerly, and served from memory.

    Only for datasets whose transform is deterministic (eval, or train with augmentation off): small
    benchmarks such as the synthetic one then cost no image decoding or resizing after the first pass,
    which on a 2-core CPU is a large share of a training step.
    """

    def __init__(self, dataset: Dataset) -> None:
        """Compute every sample of `dataset` now."""
        self.samples = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The stored sample."""
        return self.samples[index]


_STACKED = ("image", "pixel_mask", "text_ids", "text_mask", "prior_ids", "prior_mask", "box")


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample dicts into the Batch of docs/CONTRACTS.md (plus `index`, a LongTensor)."""
    batch: dict[str, Any] = {key: torch.stack([s[key] for s in samples]) for key in _STACKED}
    batch["phrase"] = [s["phrase"] for s in samples]
    batch["image_file"] = [s["image_file"] for s in samples]
    batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    return batch
