"""Map-style dataset over Records (image file + xyxy box + phrase) and the collate that builds a Batch."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from src.data.images import ImageReadError, load_image
from src.data.problems import BadRecordError, check_policy
from src.data.records import Record
from src.data.tokenizers import Tokenizer
from src.data.transforms import Transformed
from src.progress import Progress

log = logging.getLogger(__name__)

TransformFn = Callable[[Image.Image, Sequence[float], str], Transformed]
Box = tuple[float, float, float, float]


def clip_to_image(box: Sequence[float], size: tuple[int, int]) -> Box:
    """A x1y1x2y2 box clipped to a width x height image."""
    width, height = size
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def box_misses_image(box: Sequence[float], size: tuple[int, int]) -> bool:
    """True when a box of positive size has no area inside the image (clipping leaves nothing)."""
    x1, y1, x2, y2 = clip_to_image(box, size)
    has_size = box[2] > box[0] and box[3] > box[1]
    return has_size and (x2 <= x1 or y2 <= y1)


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
    A record whose image cannot be read or whose box lies entirely outside its image fails with an error
    naming `source` and the record (`bad_records="fail"`), or becomes a `skipped` sample that `collate`
    leaves out of its batch (`"skip"`); messages number a record by `positions` (its place among the
    split's records as read, before degenerate boxes were dropped; default: its index). `clip_boxes`
    clips boxes to their image (clean mode; the official loader does not); `exif_transpose` turns images
    upright by their EXIF orientation first.
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
        source: str = "split",
        bad_records: str = "fail",
        clip_boxes: bool = True,
        exif_transpose: bool = False,
        positions: Sequence[int] | None = None,
    ) -> None:
        """Keep the records and helpers; draw the phrase permutation once if a seed is given."""
        self.records = list(records)
        self.positions = list(range(len(self.records)) if positions is None else positions)
        self.image_root = Path(image_root)
        self.transform = transform
        self.bert_tok = bert_tok
        self.clip_tok = clip_tok
        self.max_query_len = max_query_len
        self.source, self.bad_records = source, check_policy(bad_records)
        self.clip_boxes, self.exif_transpose = clip_boxes, exif_transpose
        self.phrase_source = (
            derangement(len(self.records), phrase_permutation_seed)
            if phrase_permutation_seed is not None
            else None
        )
        # token ids per phrase: benchmarks repeat phrases, and tokenising one at a time is slow
        self._tokens: dict[str, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        """Number of records."""
        return len(self.records)

    def phrase_of(self, index: int) -> str:
        """The phrase sample `index` is paired with (its own, or another record's when permuted)."""
        source = index if self.phrase_source is None else self.phrase_source[index]
        return self.records[source].phrase

    def where(self, index: int) -> str:
        """`<split file>: record <position> (<image>, <phrase>)`, for messages."""
        record = self.records[index]
        return f"{self.source}: record {self.positions[index]} ({record.image}, {record.phrase!r})"

    def read_image(self, index: int) -> Image.Image:
        """A record's image, decoded in full as RGB; BadRecordError ("unreadable image") when it cannot be."""
        try:
            return load_image(self.image_root / self.records[index].image, self.where(index), self.exif_transpose)
        except ImageReadError as err:
            raise BadRecordError(f"unreadable image: {err}") from None

    def checked_box(self, index: int, size: tuple[int, int]) -> Box:
        """A record's box on an image of `size` (clipped when set); BadRecordError when it misses the image."""
        box = self.records[index].box
        if box_misses_image(box, size):
            raise BadRecordError(
                f"box outside the image: {self.where(index)}: box {box} lies outside the "
                f"{size[0]}x{size[1]} image"
            )
        return clip_to_image(box, size) if self.clip_boxes else box

    def image_and_box(self, index: int) -> tuple[Image.Image, Box]:
        """A record's RGB image and its box (clipped when set); BadRecordError when either is unusable."""
        image = self.read_image(index)
        return image, self.checked_box(index, image.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load, transform and tokenise one record (or describe why it was skipped, under "skip")."""
        record = self.records[index]
        try:
            image, box = self.image_and_box(index)
        except BadRecordError as err:
            if self.bad_records == "fail":
                raise
            return {"skipped": (index, err.kind, str(err)), "image_file": record.image, "index": index}
        out = self.transform(image, box, self.phrase_of(index))
        text_ids, text_mask, prior_ids, prior_mask = self.tokens(out.phrase)
        return {
            "image": out.image,
            "pixel_mask": out.pixel_mask,
            "text_ids": text_ids,
            "text_mask": text_mask,
            "prior_ids": prior_ids,
            "prior_mask": prior_mask,
            "box": out.box,
            "phrase": out.phrase,
            "image_file": record.image,
            "index": index,
        }

    def tokens(self, phrase: str) -> tuple[torch.Tensor, ...]:
        """BERT ids and mask, CLIP ids and mask (each (max_query_len,)) of a phrase, remembered per phrase."""
        if phrase not in self._tokens:
            bert = self.bert_tok([phrase], self.max_query_len)
            clip = self.clip_tok([phrase], self.max_query_len)
            self._tokens[phrase] = (bert[0][0], bert[1][0], clip[0][0], clip[1][0])
        return self._tokens[phrase]


_TEXT_KEYS = ("text_ids", "text_mask", "prior_ids", "prior_mask", "phrase")


class CachedSamples(Dataset):
    """A dataset's samples computed once, eagerly, and served from memory.

    Only for datasets whose transform is deterministic (eval, or train with augmentation off): small
    benchmarks such as the synthetic one then cost no image decoding or resizing after the first pass,
    which on a 2-core CPU is a large share of a training step. Each sample also gets an `image_key`, a
    digest of its image tensor: the same key means the same pixels, so the model may reuse what its
    frozen layers computed from them (`model.vision_prefix_cache`).
    """

    def __init__(
        self, dataset: Dataset | None = None, samples: list[dict[str, Any]] | None = None, what: str = "caching samples"
    ) -> None:
        """Compute every sample of `dataset` now, logging progress about every 10 s as `what` (or take already
        computed `samples`)."""
        if samples is None:
            progress = Progress(what, len(dataset), log.info, unit="samples")
            samples = []
            for i in range(len(dataset)):
                sample = dataset[i]
                samples.append(sample | {"image_key": image_digest(sample["image"])} if "image" in sample else sample)
                progress.update(i + 1)
        self.samples = samples

    def with_phrases_from(self, source: Sequence[int]) -> CachedSamples | None:
        """The samples with sample i's phrase (and its tokens) taken from sample `source[i]`; images, boxes and
        the rest stay. None when a sample was skipped (its phrase was never tokenised)."""
        if len(source) != len(self.samples) or any("skipped" in s for s in self.samples):
            return None
        return CachedSamples(samples=[
            sample | {key: self.samples[j][key] for key in _TEXT_KEYS}
            for sample, j in zip(self.samples, source, strict=True)
        ])

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The stored sample."""
        return self.samples[index]

    @property
    def nbytes(self) -> int:
        """Bytes held by the samples' tensors."""
        return sum(sample_bytes(s) for s in self.samples)


def sample_bytes(sample: dict[str, Any]) -> int:
    """Bytes of a sample's tensors (what caching it costs, strings and small numbers aside)."""
    return sum(v.numel() * v.element_size() for v in sample.values() if torch.is_tensor(v))


def image_digest(image: torch.Tensor) -> torch.Tensor:
    """A 64-bit digest (int64 scalar) of an image tensor's dtype, shape and values."""
    digest = hashlib.blake2b(f"{image.dtype}{tuple(image.shape)}".encode(), digest_size=8)
    digest.update(image.contiguous().numpy().tobytes())
    return torch.tensor(int.from_bytes(digest.digest(), "little", signed=True))


_STACKED = ("image", "pixel_mask", "text_ids", "text_mask", "prior_ids", "prior_mask", "box")


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample dicts into the Batch of docs/CONTRACTS.md (plus `index`, a LongTensor).

    Skipped samples (see RecordDataset) stay out of the tensors; `skipped` lists their (index, kind,
    message). A batch of skipped samples only has no `image` key.
    """
    kept = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {"skipped": [s["skipped"] for s in samples if "skipped" in s]}
    if kept:
        batch |= {key: torch.stack([s[key] for s in kept]) for key in _STACKED}
        if all("image_key" in s for s in kept):
            batch["image_key"] = torch.stack([s["image_key"] for s in kept])
    batch["phrase"] = [s["phrase"] for s in kept]
    batch["image_file"] = [s["image_file"] for s in kept]
    batch["index"] = torch.tensor([s["index"] for s in kept], dtype=torch.long)
    return batch
