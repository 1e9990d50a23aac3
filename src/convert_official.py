"""Convert an official MaPPER checkpoint into the suite's checkpoint format.

    python -m src.convert_official IN.pth OUT.ckpt [--max-query-len auto] [--image-size auto]

IN is what the official `train.py` saves (a dict with a `model` state dict, maybe `optimizer`,
`epoch`, `args`) or a bare state dict. It is read with `torch.load(weights_only=True)`; the only class
allowed beyond tensors and plain containers is `argparse.Namespace` (the official `args`).

The weights are renamed by `src.models.official.RULES`, loaded strictly into a randomly initialised
`model.mode=official` grounder (no downloads), and written in the suite's checkpoint format
(`src/storage/checkpoints.py`: `{"state_dict": {"model.<key>": tensor}, "config": ..., ...}`, here with every
tensor, since the official frozen CLIP blocks are random and cannot be rebuilt) that
`python -m src.run train=false ckpt_path=OUT ...` evaluates as the official-mode model it holds, plus
`OUT` with suffix `.safetensors` holding the bare grounder weights and the same config as metadata.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning
import torch
from safetensors.torch import save_file

from src.errors import reported_errors
from src.models.grounder import Grounder
from src.models.official import (
    OfficialCheckpointError,
    OfficialConversion,
    OfficialGeometry,
    build_official_grounder,
    infer_geometry,
    load_official,
)
from src.storage.checkpoints import CHECKPOINT_FORMAT, MODEL_PREFIX


def read_official_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The official state dict and the checkpoint's other entries, loaded without arbitrary unpickling."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise OfficialCheckpointError(
            f"{path} holds objects other than tensors, plain containers and argparse.Namespace, so it is not "
            f"unpickled (no unrestricted torch.load). {detail.strip()} Re-save just its `model` state dict "
            "with torch.save(ckpt['model'], ...) in an environment you trust."
        ) from err
    return split_official_checkpoint(raw)


def split_official_checkpoint(raw: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate the state dict (`raw["model"]`, or `raw` itself when bare) from the other entries."""
    if not isinstance(raw, Mapping):
        raise OfficialCheckpointError(f"expected a dict checkpoint, got {type(raw).__name__}")
    if all(torch.is_tensor(v) for v in raw.values()):
        state, extra = dict(raw), {}
    elif isinstance(raw.get("model"), Mapping):
        state, extra = dict(raw["model"]), {k: v for k, v in raw.items() if k != "model"}
    else:
        hint = " (a Lightning checkpoint: it is already in the suite's format)" if "state_dict" in raw else ""
        raise OfficialCheckpointError(f"no `model` state dict among the checkpoint's keys {sorted(raw)}{hint}")
    if state and all(k.startswith("module.") for k in state):  # saved from the DDP wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, extra


def resolve_geometry(
    official: Mapping[str, torch.Tensor], max_query_len: int | None, image_size: int | None
) -> OfficialGeometry:
    """The checkpoint's geometry; explicit values must agree with it (a clear error instead of a shape clash)."""
    geometry = infer_geometry(official)
    for name, wanted in (("max_query_len", max_query_len), ("image_size", image_size)):
        found = getattr(geometry, name)
        if wanted is not None and wanted != found:
            raise OfficialCheckpointError(
                f"--{name.replace('_', '-')} {wanted} does not match the checkpoint, whose shapes give {found}"
            )
    return geometry


def convert_official(
    official: Mapping[str, torch.Tensor], max_query_len: int | None = None, image_size: int | None = None
) -> tuple[Grounder, OfficialConversion, OfficialGeometry]:
    """Build the official-mode grounder the checkpoint fits and load it strictly (raises on any problem)."""
    geometry = resolve_geometry(official, max_query_len, image_size)
    model = build_official_grounder(geometry)
    conversion = load_official(model, official)
    return model, conversion, geometry


def _plain(value: Any) -> Any:
    """Keep only JSON-like values (the official `args` may hold anything)."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str | int | float | bool) or v is None for v in value):
        return list(value)
    return repr(value)


def lightning_checkpoint(
    model: Grounder, geometry: OfficialGeometry, source: str, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The suite's checkpoint: what `Trainer.test(ckpt_path=...)` restores into a GroundingModule."""
    args = extra.get("args")
    meta: dict[str, Any] = {"source": source, "geometry": asdict(geometry), "mode": "official"}
    if "epoch" in extra:
        meta["official_epoch"] = _plain(extra["epoch"])
    if isinstance(args, argparse.Namespace):
        meta["official_args"] = {k: _plain(v) for k, v in vars(args).items()}
    return {
        "state_dict": {MODEL_PREFIX + k: v for k, v in model.state_dict().items()},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "mapper_official": meta,
        # The suite's checkpoint format; every tensor is stored (the official CLIP blocks are random and
        # cannot be rebuilt), so nothing is fingerprinted.
        "format": CHECKPOINT_FORMAT,
        "config": suite_config(geometry),
        "frozen_fingerprint": {},
    }


def suite_config(geometry: OfficialGeometry) -> dict[str, Any]:
    """The model/peft/seed settings that rebuild the converted model (what `src.run` adopts from it)."""
    from omegaconf import OmegaConf

    from src.config import compose

    cfg = compose([
        "model=mapper_base", "peft=mapper", "model.mode=official", "model.pretrained=false",
        f"model.image_size={geometry.image_size}", f"model.max_query_len={geometry.max_query_len}",
        f"+model.vision.patch_size={geometry.patch_size}",
        f"model.adapter_layers.vision={list(geometry.vision_layers)}",
        f"model.adapter_layers.text={list(geometry.text_layers)}",
    ])
    return {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "peft": OmegaConf.to_container(cfg.peft, resolve=True), "seed": cfg.seed,
            "vision_pretraining": None, "text_pretraining": None}  # the checkpoint holds every weight


def write_outputs(
    model: Grounder, geometry: OfficialGeometry, source: str, extra: Mapping[str, Any], out: Path, safetensors: bool
) -> list[Path]:
    """Write the Lightning checkpoint to `out` and, optionally, the bare weights beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lightning_checkpoint(model, geometry, source, extra), out)
    written = [out]
    if safetensors:
        side = out.with_suffix(".safetensors")
        if side == out:
            raise OfficialCheckpointError(f"{out} would be overwritten by its .safetensors twin; name it e.g. .ckpt")
        meta = {k: str(v) for k, v in asdict(geometry).items()} | {
            "mode": "official", "source": source, "format": CHECKPOINT_FORMAT,
            "config": json.dumps(suite_config(geometry)), "frozen_fingerprint": "{}",
        }
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(side), metadata=meta)
        written.append(side)
    return written


def describe(conversion: OfficialConversion, geometry: OfficialGeometry) -> str:
    """A short human report: geometry, mapped count, dropped keys grouped by reason, surprises."""
    lines = [
        f"geometry: image_size {geometry.image_size}, patch {geometry.patch_size}, max_query_len "
        f"{geometry.max_query_len}, LoCA blocks {list(geometry.vision_layers)}, "
        f"DyPA layers {list(geometry.text_layers)}",
        f"mapped {len(conversion.state)} suite tensors; dropped {len(conversion.dropped)} official tensors (expected):",
    ]
    lines += [f"  {n:4d} x {why}" for why, n in Counter(conversion.dropped.values()).most_common()]
    lines.append(f"surprising unmapped official keys: {len(conversion.unmapped)}")
    lines += [f"  {k}" for k in conversion.unmapped]
    return "\n".join(lines)


def _auto_int(text: str) -> int | None:
    return None if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 when the checkpoint does not fit)."""
    parser = argparse.ArgumentParser(prog="python -m src.convert_official", description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path, help="official checkpoint (.pth)")
    parser.add_argument("output", type=Path, help="suite checkpoint to write (e.g. mapper_refcoco.ckpt)")
    parser.add_argument("--max-query-len", type=_auto_int, default=None, metavar="auto|L",
                        help="text length L (default auto: from vl_pos_embed's rows)")
    parser.add_argument("--image-size", type=_auto_int, default=None, metavar="auto|S",
                        help="canvas size S (default auto: from DINOv2's pos_embed)")
    parser.add_argument("--no-safetensors", action="store_true", help="do not write OUTPUT.safetensors")
    args = parser.parse_args(argv)
    try:
        official, extra = read_official_checkpoint(args.input)
        model, conversion, geometry = convert_official(official, args.max_query_len, args.image_size)
        del official
        print(describe(conversion, geometry))
        written = write_outputs(model, geometry, str(args.input), extra, args.output, not args.no_safetensors)
    except OfficialCheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    with reported_errors():  # a UserError: one `error: ...` line, exit status 1
        sys.exit(main())
