"""A cache of trained weights keyed by the settings that produced them (the pretraining stages use it)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<path>.lock` (filelock's FileLock, created if needed): of several processes
    preparing the same cache entry (DDP ranks, sweep jobs), one builds it while the others wait, then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        yield


def cached_state_dict(
    cache_dir: Path, name: str, key: dict[str, Any], train: Callable[[], dict[str, torch.Tensor]]
) -> Path:
    """Path of `<cache_dir>/<name>-synthetic-<hash of key>.pt`, calling `train()` for its state dict if missing.

    The file is written to a temporary sibling and renamed, so a crashed run never leaves a half-written
    cache entry; concurrent processes wait for the one that builds it (`exclusive`).
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{name}-synthetic-{digest}.pt"
    if path.exists():
        return path
    with exclusive(path):
        if path.exists():  # built by another process while this one waited
            return path
        state = train()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.rename(path)
    return path
