"""Small checkpoints: only what trains, plus the run's resolved config; frozen backbones are rebuilt.

A suite checkpoint is a Lightning checkpoint whose `state_dict` holds the trainable parameters and the
buffers of the modules that own them (BatchNorm statistics), under the LightningModule's `model.`
prefix, and whose extra entries are:

* `format`: `CHECKPOINT_FORMAT`;
* `config`: the run's resolved config (model, peft, seed, data, ...), so that evaluating or predicting
  needs nothing else; it is data: loading checks that it names only the suite's own classes (`src.storage.trust`);
* `choices`: the config-group choices it was trained with (`{"model": "mapper_tiny", "peft": "lora"}`);
* `frozen_fingerprint`: per frozen tensor that is *not* stored, its (sum, sum of squares), so that a
  rebuilt backbone that differs (other weights, another seed) is refused instead of silently used.

A checkpoint may also carry frozen tensors (the official converter stores everything, because the
official CLIP blocks are random and cannot be rebuilt): stored frozen tensors replace the rebuilt ones.
`export_safetensors` writes the same weights as safetensors with the config and fingerprint as metadata
(`python -m src.checkpoints export IN.ckpt OUT.safetensors`; `info CKPT` prints a summary).
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from src.data.readers import refused_global
from src.errors import UnsafeFileError, UserError

CHECKPOINT_FORMAT = "mapper-suite/petl-checkpoint-v1"
MODEL_PREFIX = "model."  # GroundingModule holds the grounder as `self.model`
FINGERPRINT_RTOL = 1e-5


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint does not fit the model built from the config; the message lists the keys."""


class CheckpointFileError(UserError, ValueError):
    """A checkpoint file that is missing, unreadable or not a suite checkpoint; the message names it."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train and the buffers of the modules owning them (e.g. LoCA's BatchNorm)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        dot = f"{prefix}." if prefix else ""
        state.update({dot + n: p.detach() for n, p in own if p.requires_grad})
        persistent = {n for n, _ in module.named_buffers(recurse=False)} - module._non_persistent_buffers_set
        state.update({dot + n: b for n, b in module.named_buffers(recurse=False) if n in persistent})
    return state


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor: (sum, sum of squares) in float64, a cheap check that rebuilt weights are the same."""
    out = {}
    for key, t in tensors.items():
        if t.is_floating_point() and not t.is_meta:
            d = t.detach().to("cpu", torch.float64)
            out[key] = [float(d.sum()), float((d * d).sum())]
    return out


def frozen_fingerprint(model: nn.Module, stored: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """The fingerprint of every model tensor that `stored` does not hold (what will be rebuilt)."""
    return fingerprint({k: v for k, v in model.state_dict().items() if k not in stored})


def listing(keys: list[str], limit: int) -> str:
    """The first `limit` keys, one per indented line, and how many more there are."""
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return "\n    ".join(keys[:limit]) + more


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse `state` unless it holds everything that trains in `model`, only keys the model has, with
    matching shapes; the message lists the mismatched keys."""
    own = model.state_dict()
    needed = trainable_state(model)
    missing = sorted(set(needed) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(state) & set(own) if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit the model built from this config"]
        for title, keys in (("missing (the model trains them)", missing), ("unexpected", unexpected),
                            ("shape mismatch", shapes)):
            if keys:
                parts.append(f"  {len(keys)} {title}:\n    {listing(keys, 20)}")
        raise CheckpointMismatchError("\n".join(parts))


def check_fingerprint(model: nn.Module, stored: Mapping[str, torch.Tensor], expected: Mapping[str, Any],
                      source: str) -> None:
    """Refuse when the rebuilt frozen tensors differ from those the checkpoint was trained with."""
    if not expected:
        return
    actual = frozen_fingerprint(model, stored)
    differ = sorted(
        k for k, (s, q) in expected.items()
        if k not in actual or not all(math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-6)
                                      for a, b in zip(actual[k], (s, q), strict=True))
    )
    if differ:
        raise CheckpointMismatchError(
            f"{source}: {len(differ)} frozen backbone tensors rebuilt from the config differ from those the "
            "checkpoint was trained with (other pretrained weights, init checkpoint or seed?):\n    "
            + listing(differ, 10)
        )


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], expected_fingerprint: Mapping[str, Any],
              source: str) -> None:
    """Check and load a (small) state into `model`; frozen tensors the state lacks stay as rebuilt."""
    check_state(model, state, source)
    check_fingerprint(model, state, expected_fingerprint, source)
    model.load_state_dict(dict(state), strict=False)


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Lightning's `model.`-prefixed keys -> the grounder's own keys (other entries are not the model's)."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in state.items() if k.startswith(MODEL_PREFIX)}


def load_checkpoint_file(path: str | Path) -> Any:
    """A `.ckpt` file's contents, unpickled only as tensors and plain containers (`weights_only=True`).

    A file that holds other objects is refused (UnsafeFileError naming the object); nothing in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        name = refused_global(str(err))
        raise UnsafeFileError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers"
            f"{f' (`{name}`)' if name else ''}, and the suite never unpickles code. Suite checkpoints hold only "
            "tensors and plain data, so this file was not written by the suite or was tampered with; "
            "use a checkpoint from a source you trust"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointFileError(f"{path}: not a readable checkpoint ({' '.join(str(err).split())})") from None


@dataclass(frozen=True)
class StoredCheckpoint:
    """What a suite checkpoint holds besides the optimiser: the grounder's state, the resolved config, the
    frozen fingerprint and the config-group choices (empty for files written before they were recorded)."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    fingerprint: dict[str, Any]
    choices: dict[str, str]


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(grounder state, resolved config, frozen fingerprint) from a suite `.ckpt` or `.safetensors` file."""
    stored = read_stored(path)
    return stored.state, stored.config, stored.fingerprint


def read_stored(path: str | Path) -> StoredCheckpoint:
    """Everything `StoredCheckpoint` names from a suite `.ckpt` or `.safetensors` file, read once.

    `.ckpt` files are read with `weights_only=True`: no code in them runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    raw = load_checkpoint_file(path)
    if not isinstance(raw, Mapping) or not isinstance(raw.get("state_dict"), Mapping):
        raise CheckpointFileError(f"{path} is not a suite checkpoint (no state_dict)")
    config, prints = raw.get("config") or {}, raw.get("frozen_fingerprint") or {}
    if not isinstance(config, Mapping) or not isinstance(prints, Mapping):
        raise CheckpointFileError(f"{path}: its `config` and `frozen_fingerprint` entries must be dicts")
    choices = plain_choices(raw.get("choices"))
    return StoredCheckpoint(strip_prefix(raw["state_dict"]), dict(config), dict(prints), choices)


def read_safetensors(path: Path) -> StoredCheckpoint:
    """`read_stored` for a `.safetensors` file: tensors, and the config, fingerprint and choices as JSON metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        config, prints = json.loads(meta.get("config", "{}")), json.loads(meta.get("frozen_fingerprint", "{}"))
        choices = json.loads(meta.get("choices", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointFileError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if not isinstance(config, dict) or not isinstance(prints, dict):
        raise CheckpointFileError(f"{path}: its `config` and `frozen_fingerprint` metadata must be JSON objects")
    return StoredCheckpoint(state, config, prints, plain_choices(choices))


def plain_choices(choices: Any) -> dict[str, str]:
    """Stored config-group choices as strings (empty when absent or not a mapping)."""
    return {str(k): str(v) for k, v in choices.items()} if isinstance(choices, Mapping) else {}


def export_safetensors(src: str | Path, out: str | Path) -> Path:
    """Write a suite checkpoint's weights as safetensors, with its config and fingerprint as metadata."""
    stored = read_stored(src)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(stored.config), "choices": json.dumps(stored.choices),
            "frozen_fingerprint": json.dumps(stored.fingerprint)}
    save_file({k: v.contiguous() for k, v in stored.state.items()}, str(out), metadata=meta)
    return out
