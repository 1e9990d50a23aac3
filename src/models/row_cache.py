"""Caches of frozen, deterministic per-sample results, read back instead of computed again.

* `PriorCache` (`model.prior_cache`): the frozen CLIP prior per phrase. The CLIP text tower is frozen
  and runs without dropout, so a phrase's prior is the same every epoch. Keyed by the phrase's token
  ids and padding mask.
* The vision encoder's frozen-prefix cache (`model.vision_prefix_cache`, src/models/encoders.py): the
  ViT's output below its first tuned block per image, keyed by a digest of the image tensor that the
  data layer computes once for samples it serves from memory (`image_key`).

Every key also holds the device and the autocast state (a bf16 run never reads an fp32 entry). Rows are
copied out of the batch they were computed in (a cached row never keeps its whole batch alive); least
recently used entries are dropped beyond `capacity` rows or `max_bytes`. A cache is cleared whenever the
frozen weights it depends on change: their identity, storage and version counters are compared at every
lookup, which catches loading a state dict, in-place updates (`copy_` under `no_grad`, `_foreach_copy_`,
EMA / SWA swaps), replaced or moved tensors. Changes made through `.data` bypass version counters:
call `clear()` after those.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence

import torch

from src.errors import ConfigError


class RowCache:
    """Rows (one tensor per sample) by key, at most `capacity` rows and `max_bytes` bytes of them; counts hits
    and misses; cleared when the weights passed to `lookup` change."""

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        if capacity < 1:
            raise ConfigError(f"a cache needs a capacity >= 1, got {capacity}")
        self.capacity, self.max_bytes = capacity, max_bytes
        self.rows: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._weights: tuple | None = None

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0

    def check_weights(self, weights: Iterable[torch.Tensor]) -> None:
        """Clear the cache when `weights` (the tensors its rows depend on) differ from the last lookup's."""
        state = tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in weights)
        if state != self._weights:
            self.clear()
            self._weights = state

    def lookup(self, keys: Sequence[Hashable], compute: Callable[[torch.Tensor], torch.Tensor],
               weights: Iterable[torch.Tensor] = ()) -> torch.Tensor:
        """The row of every key stacked (B, ...): cached rows read back, the others computed in one batch by
        `compute(positions)`, which gets the batch positions of the first occurrence of each missing key.
        `weights`: the tensors the rows depend on (a change clears the cache first)."""
        self.check_weights(weights)
        first_missing: dict[Hashable, int] = {}
        for i, key in enumerate(keys):
            if key not in self.rows and key not in first_missing:
                first_missing[key] = i
        if first_missing:
            computed = compute(torch.tensor(list(first_missing.values())))
            for key, row in zip(first_missing, computed, strict=True):
                self.rows[key] = row.clone()  # its own storage, not a view that keeps the batch alive
                self.bytes += row.numel() * row.element_size()
        self.misses += len(first_missing)
        self.hits += len(keys) - len(first_missing)
        for key in keys:
            self.rows.move_to_end(key)
        out = torch.stack([self.rows[key] for key in keys])
        while self.rows and (len(self.rows) > self.capacity or (self.max_bytes and self.bytes > self.max_bytes)):
            _, dropped = self.rows.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
        return out


class PriorCache(RowCache):
    """Prior rows (L, P) by phrase."""

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor | None,
        compute: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], weights: Iterable[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The prior of every row of `ids`: cached rows read back, the others computed in one batch."""
        context = run_context(ids.device)
        masks = mask.tolist() if mask is not None else [None] * ids.shape[0]
        rows = zip(ids.tolist(), masks, strict=True)
        keys = [(context, tuple(row), None if m is None else tuple(m)) for row, m in rows]

        def missing(index: torch.Tensor) -> torch.Tensor:
            index = index.to(ids.device)
            return compute(ids[index], None if mask is None else mask[index])

        return self.lookup(keys, missing, weights)


def run_context(device: torch.device) -> Hashable:
    """What besides the input decides a frozen module's values: the device and the autocast state."""
    enabled = torch.is_autocast_enabled(device.type)
    return str(device), enabled, torch.get_autocast_dtype(device.type) if enabled else None
