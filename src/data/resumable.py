"""The train loader that a checkpoint can resume part-way through an epoch.

`ResumableLoader.state_dict` holds what decides the rest of the epoch under way: the seed of the epoch's order and
how many batches the loader has handed out; after `load_state_dict` the loader serves exactly the batches the
uninterrupted run would have served next. Checkpoints carry that state twice: Lightning saves it for any train
loader that has a `state_dict`, and the datamodule saves it too, because Lightning hands it back only to a loader
built after the restore (src/data/datamodule.py, `load_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from src.errors import ConfigError


class ResumableSampler(DistributedSampler):
    """This process's share of an epoch, which can start part-way into it.

    A DistributedSampler (so that Lightning keeps it under DDP) with its sharding and, with `seed` set, its order
    (seeded by `seed + epoch`). With `seed=None` the epoch's order is seeded from torch's global RNG when the epoch
    starts, exactly as a DataLoader's own RandomSampler does, so that single-process runs keep their data order.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int | None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed or 0)
        self.draws_seed = seed is None
        self.order_seed: int | None = None  # the seed of the epoch under way (None: not shuffled)
        self._resume: tuple[int | None, int] | None = None  # (order seed, samples to skip) for the next __iter__

    def resume(self, order_seed: int | None, skip: int) -> None:
        """Make the next iteration continue an epoch of order `order_seed` after its first `skip` samples."""
        self._resume = (order_seed, skip)

    def __iter__(self) -> Iterator[int]:
        """The epoch's indices for this process (a generator: the order is drawn at the first index)."""
        if self._resume is not None:
            (self.order_seed, skip), self._resume = self._resume, None
        else:
            skip = 0
            if not self.shuffle:
                self.order_seed = None
            elif self.draws_seed:  # as RandomSampler draws it
                self.order_seed = int(torch.empty((), dtype=torch.int64).random_().item())
            else:
                self.order_seed = self.seed + self.epoch
        yield from self.share()[skip:]

    def share(self) -> list[int]:
        """This process's indices in the order of `order_seed`, padded as DistributedSampler pads them."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.order_seed is None:
            order = list(range(size))
        else:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.order_seed)).tolist()
        padding = self.total_size - size
        order += (order * math.ceil(padding / size))[:padding]
        return order[self.rank : self.total_size : self.num_replicas]


class ResumableLoader(DataLoader):
    """A train DataLoader whose place in the epoch under way Lightning checkpoints (with a `ResumableSampler`).

    Batches are counted as they are handed to the training loop, so the count is exact whatever worker processes
    have prefetched. The iterator is created at the epoch's first batch, after Lightning has set the sampler's
    epoch (a resumed run asks for the iterator before it sets the epoch).
    """

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.handed_out = 0  # batches of the epoch under way given to the training loop
        self._resume_at = 0  # batches the epoch to continue had given before the save

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        """Yield the epoch's batches (after a resume: the rest of them), counting them."""
        self.handed_out, self._resume_at = self._resume_at, 0
        if self.handed_out:
            # creating the iterator draws a worker seed from torch's RNG; the uninterrupted run drew it when the
            # epoch began, before the save, so drawing it again would shift every random draw after it
            with torch.random.fork_rng(devices=[]):
                batches = super().__iter__()
        else:
            batches = super().__iter__()
        for batch in batches:
            self.handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch under way stands, and what must match to continue it."""
        if not isinstance(self.sampler, ResumableSampler):  # e.g. Lightning's sequential sampler of overfit_batches
            return {}
        return {"order_seed": self.sampler.order_seed, "batches": self.handed_out,
                "samples": len(self.dataset), "batch_size": self.batch_size}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch at its next batch; a state saved at an epoch's end changes nothing."""
        if not state or not isinstance(self.sampler, ResumableSampler):
            return
        now = {"samples": len(self.dataset), "batch_size": self.batch_size}  # type: ignore[arg-type]
        differ = ", ".join(f"{k} {state[k]} -> {v}" for k, v in now.items() if state[k] != v)
        if differ:
            raise ConfigError(
                f"the checkpoint was saved inside an epoch of another train loader ({differ}): resume with the "
                "same data settings, or from a checkpoint saved at an epoch end"
            )
        if 0 < state["batches"] < len(self):
            self.sampler.resume(state["order_seed"], state["batches"] * self.batch_size)  # type: ignore[operator]
            self._resume_at = state["batches"]
