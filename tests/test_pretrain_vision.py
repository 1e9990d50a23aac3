"""The cached synthetic pretraining stage for random ViTs (src/pretraining/vision.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from src.data.synthetic import COLOURS, SHAPES, ensure_synthetic, record_attributes, split_path
from src.models.encoders import VisionSettings, build_vit
from src.pretraining.vision import VisionPretraining, ensure_pretrained_vit, patch_targets

VISION = dict(arch="vit_small_patch14_reg4_dinov2", patch_size=16, embed_dim=32, depth=2, num_heads=2,
              reg_tokens=4, init_values=1.0, random_pos_embed="sincos")
SIZE = 96


def synthetic(tmp_path: Path) -> Path:
    return ensure_synthetic(tmp_path / "data", seed=3, n_train=6, n_val=2, n_test=2)


def test_patch_targets_label_the_patch_under_each_object_centre(tmp_path: Path):
    root = synthetic(tmp_path)
    vit = build_vit(VisionSettings(**VISION), SIZE, pretrained=False, drop_registers=False)
    images, targets = patch_targets(root, vit, SIZE)
    records = torch.load(split_path(root, "train"), weights_only=True)
    scenes = {}
    for r in records:
        scenes.setdefault(r[0], record_attributes(r)["scene"]["objects"])
    assert images.shape == (len(scenes), 3, SIZE, SIZE)
    grid = SIZE // 16
    for n, image_file in enumerate(sorted(scenes)):
        labelled = int((targets["colour"][n] > 0).sum())
        assert labelled >= len(scenes[image_file])  # every object owns at least one patch
        assert torch.equal(targets["colour"][n] > 0, targets["shape"][n] > 0)
        assert torch.equal(targets["has_box"][n], targets["colour"][n] > 0)
        colours_present = {list(COLOURS)[c - 1] for c in targets["colour"][n].tolist() if c}
        shapes_present = {SHAPES[s - 1] for s in targets["shape"][n].tolist() if s}
        assert colours_present == {o["colour"] for o in scenes[image_file]}
        assert shapes_present == {o["shape"] for o in scenes[image_file]}
        boxes = targets["box"][n][targets["has_box"][n]]
        assert (boxes > 0).all() and (boxes <= 1).all()
    assert targets["colour"].shape == (len(scenes), grid * grid)


def test_stage_trains_once_caches_and_loads_into_the_vit(tmp_path: Path):
    root = synthetic(tmp_path)
    settings = VisionPretraining(steps=3, batch_size=4)
    path = ensure_pretrained_vit(root, VISION, SIZE, settings, tmp_path / "cache")
    assert path.exists()
    stamp = path.stat().st_mtime_ns
    assert ensure_pretrained_vit(root, {**VISION, "init_checkpoint": "ignored"}, SIZE, settings,
                                 tmp_path / "cache") == path
    assert path.stat().st_mtime_ns == stamp  # cached, not retrained
    other = ensure_pretrained_vit(root, VISION, SIZE, VisionPretraining(steps=4, batch_size=4), tmp_path / "cache")
    assert other != path
    torch.manual_seed(0)
    loaded = build_vit(VisionSettings(**VISION, init_checkpoint=str(path)), SIZE, pretrained=False,
                       drop_registers=False)
    torch.manual_seed(0)
    fresh = build_vit(VisionSettings(**VISION), SIZE, pretrained=False, drop_registers=False)
    saved = torch.load(path, weights_only=True)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
    assert not torch.equal(loaded.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)
