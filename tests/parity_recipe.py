"""The golden parity fixtures' recipes (../shared/parity/README.md §2-§3): weights and inputs.

Shared by the parity and converter tests; not a test module itself.
"""

from __future__ import annotations

import fnmatch
import json
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "int64": torch.int64}


def load_manifest(path: Path) -> list[dict[str, Any]]:
    """The manifest: every official state-dict entry with its shape, dtype and init kind."""
    return json.loads(Path(path).read_text())


def recipe_tensor(entry: dict[str, Any], salt: int, std: float, overrides: Iterable[dict[str, Any]]) -> torch.Tensor:
    """One manifest entry's tensor, from its own CPU generator seeded by crc32(key) + salt (§2)."""
    key, shape, dtype, init = entry["key"], entry["shape"], DTYPES[entry["dtype"]], entry["init"]
    if init == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if init == "arange":
        return torch.arange(shape[-1], dtype=dtype).expand(shape).clone()
    std_k = next((o["std"] for o in overrides if fnmatch.fnmatchcase(key, o["pattern"])), std)
    g = torch.Generator().manual_seed((zlib.crc32(key.encode("utf-8")) + salt) % 2**31)
    t = torch.randn(shape, generator=g, dtype=torch.float32) * std_k
    if init == "randn":
        return t
    if init == "one_plus_randn":
        return 1 + t
    if init == "one_plus_abs_randn":
        return 1 + t.abs()
    raise ValueError(f"unknown init {init!r} for {key}")


def recipe_state_dict(
    manifest: list[dict[str, Any]],
    weights: dict[str, Any],
    keep: Callable[[str], bool] = lambda key: True,
) -> dict[str, torch.Tensor]:
    """The official-format state dict of a case's `weights` block, for the entries `keep` accepts."""
    salt, std, overrides = int(weights["salt"]), float(weights["std"]), weights.get("std_overrides") or []
    return {e["key"]: recipe_tensor(e, salt, std, overrides) for e in manifest if keep(e["key"])}


def zeros_state_dict(manifest: list[dict[str, Any]], keep: Callable[[str], bool] = lambda key: True):
    """The official-format state dict with every tensor zero: the right keys and shapes, cheaply."""
    return {e["key"]: torch.zeros(e["shape"], dtype=DTYPES[e["dtype"]]) for e in manifest if keep(e["key"])}


def recipe_inputs(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A case's images, pixel masks (1 = padding, int32, bottom/right) and token ids (§3)."""
    samples, size = inputs["samples"], int(inputs["image_size"])
    b = len(samples)
    image = torch.randn((b, 3, size, size), generator=torch.Generator().manual_seed(int(inputs["image_seed"])))
    mask = torch.zeros((b, size, size), dtype=torch.int32)
    for i, s in enumerate(samples):
        rb, rc = int(s["pad"]["bottom"]), int(s["pad"]["right"])
        if rb > 0:
            image[i, :, size - rb :, :] = 0
            mask[i, size - rb :, :] = 1
        if rc > 0:
            image[i, :, :, size - rc :] = 0
            mask[i, :, size - rc :] = 1
    return {
        "image": image,
        "pixel_mask": mask,
        "text_ids": torch.tensor([s["input_ids"] for s in samples], dtype=torch.int64),
        "text_mask": torch.tensor([s["attention_mask"] for s in samples], dtype=torch.int64),
    }
