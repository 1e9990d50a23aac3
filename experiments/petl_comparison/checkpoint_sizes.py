"""Checkpoint size of each PEFT method at full size (DINOv2-B/14 + BERT-base, 518 px), measured.

    python experiments/petl_comparison/checkpoint_sizes.py [peft names...] [--json OUT]

For each method the full-size model is built with random weights (`model.pretrained=false`, no
downloads), and two files are written and measured: the `.safetensors` export (weights + config) and the
Lightning checkpoint as a run writes it, with AdamW's state as it stands after the first step (two
moments per trainable tensor). Prints a markdown table, sizes in MiB (2^20 bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from src.config import compose  # noqa: E402
from src.run import build_module  # noqa: E402
from src.storage.checkpoints import export_safetensors  # noqa: E402

METHODS = ["mapper", "lora", "dora", "ia3", "adapter", "adaptformer", "frozen", "full"]


def measure(peft: str, folder: Path) -> dict:
    """Build the full-size model with `peft`, write both files, return their sizes and the counts."""
    cfg = compose(["model=mapper_base", "model.pretrained=false", f"peft={peft}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(folder)
    torch.manual_seed(0)
    module = build_module(cfg)
    optimizer, _ = module.build_optimizer(total_steps=1)
    for group in optimizer.param_groups:  # AdamW's state after one step, without running one
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()], "epoch": 0}
    module.on_save_checkpoint(checkpoint)
    ckpt = folder / f"{peft}.ckpt"
    torch.save(checkpoint, ckpt)
    side = export_safetensors(ckpt, folder / f"{peft}.safetensors")
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    everything = sum(t.numel() * t.element_size() for t in module.model.state_dict().values())
    return {"peft": peft, "trainable": trainable, "ckpt_bytes": ckpt.stat().st_size,
            "safetensors_bytes": side.stat().st_size, "whole_model_bytes": everything}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", default=METHODS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for peft in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(peft, Path(tmp)))
        print(f"measured {peft}", file=sys.stderr)
    mib = 2**20
    print("| method | trainable parameters | checkpoint (.ckpt, with AdamW state) | weights (.safetensors) "
          "| whole model state |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['peft']} | {r['trainable']:,} | {r['ckpt_bytes'] / mib:.1f} MiB "
              f"| {r['safetensors_bytes'] / mib:.1f} MiB | {r['whole_model_bytes'] / mib:.0f} MiB |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
