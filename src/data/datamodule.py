"""One LightningDataModule for every benchmark, built by Hydra from `conf/data/<name>.yaml`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from src.config import checked_fields
from src.data.benchmarks import BOX_FORMATS, BenchmarkSpec, get_benchmark
from src.data.dataset import CachedSamples, RecordDataset, collate, derangement, sample_bytes
from src.data.problems import DataError, check_policy
from src.data.readers import SplitFileError, is_degenerate, read_jsonl, read_refer, read_transvg
from src.data.records import Record
from src.data.resumable import ResumableLoader, ResumableSampler
from src.data.tokenizers import bert_tokenizer, clip_tokenizer
from src.data.transforms import AugmentSettings, build_transform
from src.errors import ConfigError
from src.quirks import MODES, AugmentQuirks

log = logging.getLogger(__name__)

SPLIT_FORMATS = ("transvg", "refer", "jsonl")


@dataclass(frozen=True)
class ReaderSettings:
    """How split files are read; None values follow the benchmark and the mode."""

    # "transvg" (.pth split files), "refer" (refs(<splitBy>).p + instances.json), "jsonl"; None = benchmark's.
    format: str | None = None
    # Box format in the split files: "xyxy" | "xywh" | "auto" (detect); None = the benchmark's declared one.
    box_format: str | None = None
    # Truncate stored box numbers to ints before conversion (the official loader); None = official mode.
    int_boxes: bool | None = None
    # Drop records whose box has zero or negative size (always logged and counted).
    drop_degenerate: bool = True
    # Folder holding <refcoco|refcoco+|refcocog>/refs(<splitBy>).p for format "refer"; None = split_root.
    refer_root: str | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ReaderSettings:
        """Build from a config mapping, rejecting unknown keys."""
        return cls(**checked_fields(cls, config, "reader"))


class GroundingDataModule(L.LightningDataModule):
    """Reads a benchmark's splits (TransVG .pth, REFER, JSONL or the synthetic generator) into loaders."""

    def __init__(
        self,
        dataset: str,
        split_root: str | None = None,
        image_root: str | None = None,
        data_root: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_splits: Sequence[str] = ("val",),
        batch_size: int = 32,
        num_workers: int = 4,
        image_size: int = 518,
        max_query_len: int = 20,
        mode: str = "clean",
        augment: Mapping[str, Any] | None = None,
        reader: Mapping[str, Any] | None = None,
        bert_vocab: str | None = None,
        clip_vocab: str | None = None,
        cache_dir: str | None = None,
        synthetic: Mapping[str, Any] | None = None,
        pretraining_synthetic: Mapping[str, Any] | None = None,
        drop_last: bool = True,
        pin_memory: bool = False,
        shuffle_text_seed: int = 0,
        cache_samples: bool = False,
        cache_max_mb: float | None = 4096,
        bad_records: str = "fail",
        exif_transpose: bool = False,
        shuffle: bool = True,
        name: str | None = None,
    ) -> None:
        """Store the settings; nothing is read until prepare_data/setup. `name` is the benchmark config's
        (`data=<name>`: run names, messages), `dataset` the split-file key it reads (`unc` for refcoco)."""
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.spec: BenchmarkSpec = get_benchmark(dataset)
        self.name = name or dataset
        self.train_split, self.val_split = train_split, val_split
        self.test_splits = list(test_splits)
        for split in (train_split, val_split, *self.test_splits):
            self.spec.check_split(split)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.image_size, self.max_query_len, self.mode = image_size, max_query_len, mode
        augment = dict(augment or {})
        self.augment_quirks = dict(augment.pop("quirks", None) or {})  # single quirks against the mode
        AugmentQuirks.resolve(mode, self.augment_quirks)  # unknown names fail here, not at the first batch
        self.augment = AugmentSettings.from_config(augment)
        self.reader = ReaderSettings.from_config(reader)
        self.bert_vocab, self.clip_vocab = bert_vocab, clip_vocab
        self.cache_dir, self.synthetic = cache_dir, dict(synthetic or {})
        self.pretraining_synthetic = dict(pretraining_synthetic or {})
        self.drop_last, self.pin_memory, self.shuffle_text_seed = drop_last, pin_memory, shuffle_text_seed
        self.cache_samples, self.cache_max_mb = cache_samples, cache_max_mb
        self.bad_records, self.exif_transpose = check_policy(bad_records), exif_transpose
        self.shuffle = shuffle
        self._split_root, self._image_root, self._data_root = split_root, image_root, data_root
        self._generated_root: Path | None = None
        self._tokenizers: tuple[Any, Any] | None = None
        self.datasets: dict[str, Dataset] = {}
        self.dropped: dict[str, int] = {}
        self._records: dict[str, list[Record]] = {}
        self._positions: dict[str, list[int]] = {}  # per split: each usable record's place among those read
        self._train_loader: ResumableLoader | None = None
        self._train_position: dict[str, Any] | None = None  # a checkpoint's train loader state, not yet applied

    # ------------------------------------------------------------------------------------------ roots

    def prepare_data(self) -> None:
        """Generate the benchmark (cached) when its spec has a generator; real data is read in place."""
        if self.spec.generator is not None:
            self.generated_root()

    def generate(self, **settings: Any) -> Path:
        """The spec's generator run with `settings` (cached by them) under `data.cache_dir`."""
        if self.spec.generator is None:
            raise ConfigError(f"benchmark {self.name!r} is read from disk, not generated")
        if self.cache_dir is None:
            raise ConfigError(f"data.cache_dir must be set for the generated benchmark {self.name!r}")
        return Path(self.spec.generator(self.cache_dir, **settings))

    def generated_root(self) -> Path:
        """Folder of a generated benchmark (`data.synthetic` settings), made once per settings."""
        if self._generated_root is None:
            self._generated_root = self.generate(**self.synthetic)
        return self._generated_root

    def pretraining_corpus(self, seed: int, scenes: int) -> Path:
        """A separate corpus (train split only) generated like the benchmark but from another seed, with the
        generator settings `data.pretraining_synthetic` changes (e.g. fewer colours: a domain gap).

        Backbone pretraining uses it, so that the benchmark's own splits are seen only by the grounder.
        """
        if seed == self.synthetic.get("seed", 0):
            raise ConfigError(f"the pretraining corpus needs a seed other than the benchmark's ({seed})")
        sized = {"seed": seed, "n_train": scenes, "n_val": 0, "n_test": 0}
        clash = sorted(set(self.pretraining_synthetic) & set(sized))
        if clash:
            raise ConfigError(f"data.pretraining_synthetic cannot set {clash}: set pretraining_corpus.seed / .scenes")
        return self.generate(**{**self.synthetic, **self.pretraining_synthetic, **sized})

    @property
    def data_root(self) -> Path | None:
        """The data root the benchmark's default image folder is relative to (None when not set)."""
        return None if self._data_root is None else Path(self._data_root)

    @property
    def split_root(self) -> Path:
        """Folder of the split files (for a generated benchmark: its `splits/`)."""
        if self.spec.generator is not None:
            return self.generated_root() / "splits"
        if self._split_root is None:
            raise ConfigError(f"data.split_root must be set for benchmark {self.name!r}")
        return Path(self._split_root)

    @property
    def image_root(self) -> Path:
        """Folder the records' image files are relative to (default: data_root / the benchmark's folder)."""
        if self.spec.generator is not None and self._image_root is None:
            return self.generated_root() / self.spec.image_dir
        if self._image_root is not None:
            return Path(self._image_root)
        if self.data_root is None or not self.spec.image_dir:
            raise ConfigError(f"set data.image_root (or data.data_root) for benchmark {self.name!r}")
        return self.data_root / self.spec.image_dir

    # ------------------------------------------------------------------------------------------ reading

    @property
    def split_format(self) -> str:
        """The split-file format in use: the reader setting, else the benchmark's."""
        fmt = self.reader.format or ("jsonl" if self.spec.record_shape == "jsonl" else "transvg")
        if fmt not in SPLIT_FORMATS:
            raise ConfigError(f"data.reader.format must be one of {SPLIT_FORMATS}, got {fmt!r}")
        if fmt == "refer" and self.spec.refer is None:
            raise ConfigError(f"benchmark {self.name!r} has no REFER-format release; use format transvg")
        return fmt

    @property
    def int_boxes(self) -> bool:
        """Whether boxes are int-truncated on reading (default: in official mode, as the official loader)."""
        return self.mode == "official" if self.reader.int_boxes is None else self.reader.int_boxes

    @property
    def box_format(self) -> str | None:
        """Box format passed to the readers; None = detect (.pth) or take the file's declaration (JSONL)."""
        fmt = self.reader.box_format or self.spec.box_format
        if fmt in (None, "auto"):
            return None
        if fmt not in BOX_FORMATS:
            raise ConfigError(f"data.reader.box_format must be one of {(*BOX_FORMATS, 'auto')}, got {fmt!r}")
        return fmt

    def _refer_source(self) -> tuple[Path, str, str]:
        """(REFER root, REFER dataset name, splitBy) for format "refer"."""
        name, split_by = self.spec.refer or ("", "")
        return Path(self.reader.refer_root or self.split_root), name, split_by

    def split_file(self, split: str) -> Path:
        """The file a split is read from (for REFER: the refs pickle)."""
        if self.split_format == "refer":
            root, name, split_by = self._refer_source()
            return root / name / f"refs({split_by}).p"
        return self.spec.split_file(self.split_root, split)

    def read_split(self, split: str) -> list[Record]:
        """All records of a split as stored (nothing dropped), boxes converted to float xyxy."""
        fmt = self.split_format
        if fmt == "refer":
            return read_refer(*self._refer_source(), split, self.int_boxes)
        if fmt == "jsonl":
            return read_jsonl(self.split_file(split), self.box_format, self.int_boxes)
        return read_transvg(self.split_file(split), self.box_format, self.int_boxes)

    def usable_records(self, split: str) -> list[Record]:
        """A split's records minus degenerate boxes (if drop_degenerate), read once per split."""
        if split not in self._records:
            self.adopt_records(split, self.read_split(split))
        return self._records[split]

    def adopt_records(self, split: str, records: list[Record]) -> list[Record]:
        """Take a split's records as read as the ones it uses: degenerate boxes dropped (if drop_degenerate).

        A split with no usable record is an error naming its file (an empty loader would fail later with
        a message naming nothing). The data doctor calls this on the records it has read, so that it
        refuses exactly what a run refuses.
        """
        if not records:
            raise SplitFileError(f"{self.split_file(split)}: split {split!r} has no records")
        kept = self._drop_degenerate(split, records)
        if not kept:
            raise SplitFileError(
                f"{self.split_file(split)}: split {split!r}: all {len(records)} records have a zero or "
                "negative size box (data.reader.drop_degenerate=false keeps them)"
            )
        self._records[split], self._positions[split] = [records[i] for i in kept], kept
        return self._records[split]

    def reading_problems(self) -> dict[str, dict[str, int]]:
        """Records left out at reading, per split and reason (for results.json)."""
        return {split: {"degenerate box": n} for split, n in self.dropped.items() if n}

    def _drop_degenerate(self, split: str, records: list[Record]) -> list[int]:
        """The positions of the records kept: those with a box of positive size when drop_degenerate is set
        (with a warning and a count in `dropped`), else all."""
        if not self.reader.drop_degenerate:
            return list(range(len(records)))
        bad = [i for i, r in enumerate(records) if is_degenerate(r.box)]
        self.dropped[split] = len(bad)
        if bad:
            log.warning(
                "%s/%s: dropped %d of %d records with a zero or negative size box (first: record %d, %s)",
                self.spec.key,
                split,
                len(bad),
                len(records),
                bad[0],
                records[bad[0]],
            )
        bad_set = set(bad)
        return [i for i in range(len(records)) if i not in bad_set]

    # ------------------------------------------------------------------------------------------ datasets

    def tokenizers(self) -> tuple[Any, Any]:
        """(BERT, CLIP) tokenizers from the configured vocabularies (None = the bundled ones), built once."""
        if self._tokenizers is None:
            self._tokenizers = (bert_tokenizer(self.bert_vocab), clip_tokenizer(self.clip_vocab))
        return self._tokenizers

    def record_dataset(self, split: str, train: bool, phrase_permutation_seed: int | None = None) -> RecordDataset:
        """A RecordDataset over a split's usable records with the train or eval transform."""
        bert, clip = self.tokenizers()
        transform = build_transform(train, self.image_size, self.augment, self.mode, self.augment_quirks)
        records = self.usable_records(split)
        return RecordDataset(
            records,
            self.image_root,
            transform,
            bert,
            clip,
            self.max_query_len,
            phrase_permutation_seed,
            source=str(self.split_file(split)),
            bad_records=self.bad_records,
            clip_boxes=self.mode == "clean",
            exif_transpose=self.exif_transpose,
            positions=self._positions[split],
        )

    def make_dataset(
        self, split: str, train: bool, phrase_permutation_seed: int | None = None
    ) -> Dataset:
        """The split's RecordDataset (see record_dataset).

        With `cache_samples`, a split whose transform is deterministic (eval, or train with augmentation
        off) is computed once into memory instead.
        """
        dataset = self.record_dataset(split, train, phrase_permutation_seed)
        if self.cache_samples and not (train and self.augment.enabled) and self.fits_in_cache(split, dataset):
            log.info("caching the %d samples of %s in memory", len(dataset), split)
            return CachedSamples(dataset, what=f"caching {split}")
        return dataset

    def fits_in_cache(self, split: str, dataset: Dataset) -> bool:
        """Whether caching `dataset` keeps this process's cached samples within `cache_max_mb` (estimated from
        its first sample); when not, it is served computed on the fly, with a warning. Under DDP every
        process holds its own cache, so a node holds `cache_max_mb` times its processes at most."""
        if self.cache_max_mb is None or len(dataset) == 0:
            return True
        held = sum(d.nbytes for d in self.datasets.values() if isinstance(d, CachedSamples))
        need = sample_bytes(dataset[0]) * len(dataset)
        if held + need <= self.cache_max_mb * 2**20:
            return True
        log.warning("data.cache_samples: %s is not cached: its %d samples take about %.0f MiB, and with the %.0f MiB "
                    "already cached that exceeds data.cache_max_mb=%g per process; its samples are computed on the "
                    "fly (raise data.cache_max_mb if the memory is there)", split, len(dataset), need / 2**20,
                    held / 2**20, self.cache_max_mb)
        return False

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets the stage needs (fit: train + val; validate: val; test: the test splits)."""
        wanted: list[tuple[str, bool]] = []
        if stage in (None, "fit"):
            wanted += [(self.train_split, True), (self.val_split, False)]
        if stage in (None, "validate"):
            wanted.append((self.val_split, False))
        if stage in (None, "test", "predict"):
            wanted += [(split, False) for split in self.test_splits]
        for split, train in wanted:
            key = f"train:{split}" if train else split
            if key not in self.datasets:
                self.datasets[key] = self.make_dataset(split, train)

    # ------------------------------------------------------------------------------------------ loaders

    @property
    def world_size(self) -> int:
        """Processes of the attached Trainer (1 when none is attached)."""
        return self.trainer.world_size if self.trainer is not None else 1

    def eval_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under several processes, each evaluation sample goes to exactly one of them.

        Lightning would otherwise use a DistributedSampler, which pads every process to the same count
        by repeating samples: Acc@0.5, mean IoU and n would count up to world_size - 1 samples twice.
        The metric's states are summed over processes, so the unequal shares add up exactly.
        """
        if self.world_size == 1:
            return None
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.trainer.global_rank, shuffle=False
        )

    def train_sampler(self, dataset: Dataset) -> ResumableSampler:
        """This process's share of the train split, in an order a checkpoint can resume part-way through an epoch.

        Under several processes it shards and orders as a DistributedSampler seeded as Lightning seeds its own
        (PL_GLOBAL_SEED), but honours `shuffle` (Lightning's own always shuffles); in one process it orders as a
        DataLoader's RandomSampler (seeded from torch's RNG at each epoch start).
        """
        if self.world_size == 1:
            return ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=self.shuffle, seed=None)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return ResumableSampler(
            dataset, num_replicas=self.world_size, rank=self.trainer.global_rank, shuffle=self.shuffle, seed=seed
        )

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        """A DataLoader with the Batch collate; when training, resumable inside an epoch (src/data/resumable.py)
        and dropping the last partial batch.

        Cached datasets are served without worker processes: nothing is left for them to compute. Worker processes
        take their seeds from a generator of their own (seeded by PL_GLOBAL_SEED and the rank), not from torch's
        RNG: a resumed run then draws from that RNG exactly what the uninterrupted run draws after the save.
        """
        workers = 0 if isinstance(dataset, CachedSamples) else self.num_workers
        generator = None
        if workers:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            generator = torch.Generator().manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)) + rank)
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=self.train_sampler(dataset) if train else self.eval_sampler(dataset),
            drop_last=train and self.drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.pin_memory,
            collate_fn=collate,
            generator=generator,
        )

    def _dataset(self, key: str, split: str, train: bool) -> Dataset:
        """A dataset built by setup, or built now when setup did not cover it."""
        if key not in self.datasets:
            self.datasets[key] = self.make_dataset(split, train)
        return self.datasets[key]

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented loader over the train split, resumable inside an epoch; refuses a split too small for
        one batch."""
        dataset = self._dataset(f"train:{self.train_split}", self.train_split, True)
        self.check_one_batch(len(dataset))
        self._train_loader = self._loader(dataset, train=True)
        if self._train_position:
            self._train_loader.load_state_dict(self._train_position)
            self._train_position = None
        return self._train_loader

    def state_dict(self) -> dict[str, Any]:
        """Where the train loader stands in its epoch: checkpoints carry it, and a resumed run continues there."""
        return {} if self._train_loader is None else {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's train loader state for the next train loader. Lightning restores its own copy only
        into a loader built after the restore, and this one is built before it (the LR schedule asks for its length)."""
        self._train_position = state_dict.get("train_loader")

    def check_one_batch(self, size: int) -> None:
        """With drop_last, a process needs at least one full batch, or it trains on nothing and "succeeds"."""
        world = self.world_size
        per_process = -(-size // world)  # DistributedSampler pads every process to the same count
        if self.drop_last and per_process < self.batch_size:
            raise DataError(
                f"{self.split_file(self.train_split)}: the train split has {size} usable records, "
                f"{per_process} per process over {world}, fewer than one batch of {self.batch_size} with "
                "data.drop_last=true: no training step would run. Lower data.batch_size or set "
                "data.drop_last=false."
            )

    def val_dataloader(self) -> DataLoader:
        """Loader over the val split (eval transform)."""
        return self._loader(self._dataset(self.val_split, self.val_split, False), train=False)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test split, in `test_splits` order (names in `test_split_names`)."""
        return [self._loader(self._dataset(s, s, False), train=False) for s in self.test_splits]

    @property
    def test_split_names(self) -> list[str]:
        """Names of the test loaders, index-aligned with test_dataloader()."""
        return list(self.test_splits)

    def shuffled_text_dataloader(self, split: str) -> DataLoader:
        """Eval loader over a split whose phrases are deranged across records (language-reliance check)."""
        self.spec.check_split(split)
        cached = self.datasets.get(split)
        if isinstance(cached, CachedSamples):  # the eval transform ignores the phrase: keep the computed images
            shuffled = cached.with_phrases_from(derangement(len(cached), self.shuffle_text_seed))
            if shuffled is not None:
                return self._loader(shuffled, train=False)
        return self._loader(self.make_dataset(split, False, self.shuffle_text_seed), train=False)
