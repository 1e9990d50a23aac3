"""A cache of the frozen CLIP prior per phrase (`model.prior_cache`): the prior depends only on the phrase.

The CLIP text tower is frozen and runs without dropout, so a phrase's prior is the same every epoch;
with a cache it is computed once and then read back. Entries are keyed by the phrase's token ids (and
padding mask), the device and the autocast state, so a bf16 run never reads an fp32 entry. Least
recently used entries are dropped beyond `capacity`; loading new weights clears the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch


class PriorCache:
    """Prior rows (L, P) by phrase, at most `capacity` of them; counts hits and misses."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a prior cache needs a capacity >= 1, got {capacity}")
        self.capacity = capacity
        self.rows: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.rows.clear()

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor | None,
        compute: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        """The prior of every row of `ids`: cached rows read back, the others computed in one batch."""
        context = _context(ids.device)
        masks = mask.tolist() if mask is not None else [None] * ids.shape[0]
        rows = zip(ids.tolist(), masks, strict=True)
        keys = [(context, tuple(row), None if m is None else tuple(m)) for row, m in rows]
        first_missing: dict[Hashable, int] = {}
        for i, key in enumerate(keys):
            if key not in self.rows and key not in first_missing:
                first_missing[key] = i
        if first_missing:
            index = torch.tensor(list(first_missing.values()), device=ids.device)
            computed = compute(ids[index], None if mask is None else mask[index])
            for key, row in zip(first_missing, computed, strict=True):
                self.rows[key] = row
        self.misses += len(first_missing)
        self.hits += len(keys) - len(first_missing)
        for key in keys:
            self.rows.move_to_end(key)
        out = torch.stack([self.rows[key] for key in keys])
        while len(self.rows) > self.capacity:
            self.rows.popitem(last=False)
        return out


def _context(device: torch.device) -> Hashable:
    """What besides the phrase decides the prior's values: the device and the autocast state."""
    enabled = torch.is_autocast_enabled(device.type)
    return str(device), enabled, torch.get_autocast_dtype(device.type) if enabled else None
