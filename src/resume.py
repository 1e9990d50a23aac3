"""`ckpt_path=last`: find the newest `last.ckpt` of an earlier run with the same settings, to resume it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from src.errors import ConfigError

# The settings that make two runs "the same run" (trainer, logging and paths may differ, e.g. to train
# longer or on another machine).
RESUME_KEYS = ("task_name", "model", "peft", "data", "optim", "loss", "seed", "pretraining_corpus",
               "vision_pretraining", "text_pretraining")


def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved run config that must match; backbone init files are derived, so left out."""
    out = {k: config.get(k) for k in RESUME_KEYS}
    model = dict(out["model"] or {})
    for part in ("vision", "text", "prior"):
        if isinstance(model.get(part), Mapping):
            model[part] = {k: v for k, v in model[part].items() if k != "init_checkpoint"}
    out["model"] = model
    return out


def find_last_checkpoint(config: Mapping[str, Any], roots: Iterable[str | Path]) -> Path:
    """The most recently written `last.ckpt` under `roots` whose run had these settings."""
    candidates = [p for root in map(Path, roots) if root.is_dir() for p in root.rglob("last.ckpt")]
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    wanted = comparable(config)
    for path in candidates:
        stored = torch.load(path, map_location="cpu", weights_only=True).get("config") or {}
        if comparable(stored) == wanted:
            return path
    raise ConfigError(
        f"ckpt_path=last: none of the {len(candidates)} last.ckpt files under {[str(r) for r in roots]} comes from "
        "a run with these settings (task_name, model, peft, data, optim, loss, seed, pretraining)"
    )
