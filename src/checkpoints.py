"""`python -m src.checkpoints export IN.ckpt OUT.safetensors` (the same weights as safetensors, config and
fingerprint as metadata) and `python -m src.checkpoints info CKPT` (what a checkpoint holds, as JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from src.errors import reported_errors
from src.storage.checkpoints import export_safetensors, read_stored


def describe(path: str | Path) -> dict[str, Any]:
    """Tensor count, parameter count and bytes of a checkpoint's weights, and what it was trained as."""
    stored = read_stored(path)
    state, config, prints, choices = stored.state, stored.config, stored.fingerprint, stored.choices
    peft = config.get("peft") or {}
    return {
        "file": str(path),
        "file_bytes": Path(path).stat().st_size,
        "tensors": len(state),
        "values": sum(t.numel() for t in state.values()),
        "weight_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "rebuilt_frozen_tensors": len(prints),
        "method": peft.get("name") or choices.get("peft") or peft.get("_target_"),
        "model_mode": (config.get("model") or {}).get("mode"),
        "seed": config.get("seed"),
    }


def main(argv: list[str] | None = None) -> int:
    """`export IN OUT.safetensors` or `info CKPT`."""
    parser = argparse.ArgumentParser(prog="python -m src.checkpoints", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a checkpoint's weights + config as .safetensors")
    export.add_argument("input", type=Path)
    export.add_argument("output", type=Path)
    info = sub.add_parser("info", help="print what a checkpoint holds, as JSON")
    info.add_argument("input", type=Path)
    args = parser.parse_args(argv)
    if args.command == "export":
        print(f"wrote {export_safetensors(args.input, args.output)}")
    else:
        print(json.dumps(describe(args.input), indent=2))
    return 0


if __name__ == "__main__":
    with reported_errors():  # a UserError: one `error: ...` line, exit status 1
        sys.exit(main())
