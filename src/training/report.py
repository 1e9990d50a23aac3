"""What a run leaves behind for people: the per-split table, results.json and a picture of predictions."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from src.training.metrics import split_metric_key

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def split_metrics(logged: Mapping[str, Any], splits: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Collect the `test/<split>/{acc50,miou,n}` entries from Lightning's logged metrics."""
    out = {}
    for split in splits:
        out[split] = {
            "acc50": float(logged[split_metric_key(split, "acc50")]),
            "miou": float(logged[split_metric_key(split, "miou")]),
            "n": int(logged[split_metric_key(split, "n")]),
        }
    return out


def print_table(splits: Mapping[str, Mapping[str, float]], shuffled: Mapping[str, Mapping[str, float]]) -> None:
    """Acc@0.5, mean IoU and sample count per test split (and shuffled-text Acc@0.5 when measured)."""
    table = Table(title="Test results")
    for col in ("split", "Acc@0.5", "mean IoU", "samples", "Acc@0.5 shuffled text"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, m in splits.items():
        shuf = f"{shuffled[name]['acc50']:.4f}" if name in shuffled else "-"
        table.add_row(name, f"{m['acc50']:.4f}", f"{m['miou']:.4f}", str(m["n"]), shuf)
    Console(width=100).print(table)


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write results.json (keys: splits, shuffled_text, wall_seconds, parameters, config...)."""
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))


def denormalise(image: torch.Tensor) -> Image.Image:
    """An ImageNet-normalised (3, S, S) tensor back to a PIL image."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((image.cpu().float() * std + mean).clamp(0, 1) * 255).byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def canvas_with_boxes(image: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, tile: int) -> Image.Image:
    """One canvas resized to `tile` px with its ground-truth (green) and predicted (red) cxcywh boxes."""
    canvas = denormalise(image).resize((tile, tile), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for box, colour in ((gt, (0, 200, 0)), (pred, (230, 0, 0))):
        cx, cy, w, h = (box.float() * tile).tolist()
        draw.rectangle([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], outline=colour, width=2)
    return canvas


def prediction_grid(
    images: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor, phrases: Sequence[str], columns: int = 4,
    tile: int = 192,
) -> Image.Image:
    """Tiles of test canvases with the ground-truth (green) and predicted (red) boxes and the phrase."""
    n = len(phrases)
    rows = (n + columns - 1) // columns
    caption = 28
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), "white")
    for i in range(n):
        canvas = canvas_with_boxes(images[i], gt[i], pred[i], tile)
        x, y = (i % columns) * tile, (i // columns) * (tile + caption)
        sheet.paste(canvas, (x, y))
        text = phrases[i] if len(phrases[i]) <= 34 else phrases[i][:33] + "…"
        ImageDraw.Draw(sheet).text((x + 4, y + tile + 6), text, fill="black")
    return sheet
