"""A cache of trained weights keyed by the settings that produced them (the pretraining stages use it)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock


def cached_state_dict(
    cache_dir: Path, name: str, key: dict[str, Any], train: Callable[[], dict[str, torch.Tensor]]
) -> Path:
    """Path of `<cache_dir>/<name>-synthetic-<hash of key>.pt`, calling `train()` for its state dict if missing.

    The file is written to a temporary sibling and renamed, so a crashed run never leaves a half-written
    cache entry; concurrent processes (DDP ranks, sweep jobs) wait for the one that builds it (filelock's FileLock).
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{name}-synthetic-{digest}.pt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        if path.exists():  # built by another process while this one waited
            return path
        state = train()
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.rename(path)
    return path
