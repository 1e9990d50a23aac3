"""A short, cached pretraining stage for a randomly initialised ViT on the synthetic benchmark.

No pretrained weights exist offline, and a frozen *random* ViT gives features from which the fusion
head learns to ground phrases very slowly. This stage gives the tiny default job backbones whose
freezing means something, the way DINOv2's pretraining does for the real model: the ViT is trained
for about a thousand steps on the scenes of a synthetic corpus (a separate draw of the generator, so
the benchmark's own images are seen only by the grounder) to predict, for every patch, the colour and
shape of the object covering it (or background) and that object's box. Only scene layouts are used
(never the referring expressions), the weights are cached by their settings, and the grounder then
loads them into its ViT (`model.vision.init_checkpoint`) and freezes them as usual.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from src.data.synthetic import COLOURS, SHAPES, record_attributes, split_path
from src.data.transforms import EvalTransform
from src.models.encoders import VisionSettings, build_vit
from src.progress import Progress
from src.storage.weights_cache import cached_state_dict
from src.training.schedules import one_cycle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisionPretraining:
    """Settings of the stage (all of them, with the ViT's settings, key the cache)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 1.0e-3
    box_weight: float = 5.0  # weight of the per-patch box L1 beside the two classification losses
    seed: int = 0


def ensure_pretrained_vit(
    synthetic_root: Path, vision: dict[str, Any], image_size: int, settings: VisionPretraining, cache_dir: Path,
    drop_registers: bool = False,
) -> Path:
    """Path of the pretrained ViT state dict for these settings, training it first if not cached."""
    vision = {k: v for k, v in vision.items() if k != "init_checkpoint"}
    key = {"data": synthetic_root.name, "vision": vision, "size": image_size, "no_reg": drop_registers,
           **asdict(settings)}

    def train() -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        torch.manual_seed(settings.seed)
        vit = build_vit(VisionSettings(**vision), image_size, pretrained=False, drop_registers=drop_registers)
        images, targets = patch_targets(synthetic_root, vit, image_size)
        losses = train_dense(vit, images, targets, settings)
        log.info("vision pretraining: %d steps in %.1f s, final losses %s", settings.steps,
                 time.perf_counter() - start, {k: round(v, 3) for k, v in losses.items()})
        return vit.state_dict()

    return cached_state_dict(cache_dir, "vit", key, train)


def patch_targets(root: Path, vit: nn.Module, image_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eval-transformed training images and, per patch, colour / shape class (0 = background) and box.

    A patch belongs to an object when its centre lies in the object's box; the patch under the box
    centre always does, so that small objects are never missed.
    """
    records = torch.load(split_path(root, "train"), weights_only=True)
    scenes: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record[0] not in scenes:
            scenes[record[0]] = record_attributes(record)["scene"]["objects"]
    transform = EvalTransform(image_size)
    gh, gw = vit.patch_embed.grid_size
    patch = image_size / gw
    column_centres, row_centres = [(j + 0.5) * patch for j in range(gw)], [(i + 0.5) * patch for i in range(gh)]
    images, colours, shapes, boxes, has_box = [], [], [], [], []
    for image_file in sorted(scenes):
        objects = scenes[image_file]
        with Image.open(root / "images" / image_file) as img:
            t = transform(img.convert("RGB"), objects[0]["box"], "")
        (sx, sy), (ox, oy) = t.meta.scale, t.meta.offset
        colour = torch.zeros(gh * gw, dtype=torch.long)
        shape = torch.zeros(gh * gw, dtype=torch.long)
        box = torch.zeros(gh * gw, 4)
        for obj in objects:  # later objects paint over earlier ones
            x1, y1, x2, y2 = obj["box"]
            x1, x2, y1, y2 = x1 * sx + ox, x2 * sx + ox, y1 * sy + oy, y2 * sy + oy
            rows = torch.tensor([y1 <= c <= y2 for c in row_centres])
            cols = torch.tensor([x1 <= c <= x2 for c in column_centres])
            cells = (rows[:, None] & cols[None, :]).flatten()
            cells[min(int((y1 + y2) / 2 / patch), gh - 1) * gw + min(int((x1 + x2) / 2 / patch), gw - 1)] = True
            colour[cells] = 1 + list(COLOURS).index(obj["colour"])
            shape[cells] = 1 + SHAPES.index(obj["shape"])
            box[cells] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) / image_size
        images.append(t.image)
        colours.append(colour)
        shapes.append(shape)
        boxes.append(box)
        has_box.append(colour > 0)
    targets = {"colour": torch.stack(colours), "shape": torch.stack(shapes), "box": torch.stack(boxes),
               "has_box": torch.stack(has_box)}
    return torch.stack(images), targets


def train_dense(
    vit: nn.Module, images: torch.Tensor, targets: dict[str, torch.Tensor], settings: VisionPretraining
) -> dict[str, float]:
    """Train the whole ViT with a linear per-patch head (discarded afterwards); returns the last losses.

    Logs a progress line (step, losses, speed, time left) about every 10 s."""
    n_colour, n_shape = 1 + len(COLOURS), 1 + len(SHAPES)
    head = nn.Linear(vit.embed_dim, n_colour + n_shape + 4)
    params = [*vit.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    schedule = one_cycle(optimizer, settings.lr, settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    prefix = vit.num_prefix_tokens
    vit.train()
    losses: dict[str, float] = {}
    progress = Progress("vision pretraining", settings.steps, log.info)
    for step in range(1, settings.steps + 1):
        idx = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
        out = head(vit.forward_features(images[idx])[:, prefix:])
        has = targets["has_box"][idx]
        parts = {
            "colour": F.cross_entropy(out[..., :n_colour].flatten(0, 1), targets["colour"][idx].flatten()),
            "shape": F.cross_entropy(out[..., n_colour:-4].flatten(0, 1), targets["shape"][idx].flatten()),
            "box": F.l1_loss(out[..., -4:].sigmoid()[has], targets["box"][idx][has]),
        }
        loss = parts["colour"] + parts["shape"] + settings.box_weight * parts["box"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses = {k: v.item() for k, v in parts.items()}
        progress.update(step, **losses)
    vit.eval()
    return losses
