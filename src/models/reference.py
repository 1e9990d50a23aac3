"""The backbones' reference size: the denominator of the tunable-backbone share, counted as MaPPER counts
its 1.41 %: the standard released architectures at the configured sizes, the CLIP prior excluded."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from torch import nn

from src.models.encoders import TextSettings, VisionSettings, text_config, text_model
from src.models.roles import text_family


@dataclass(frozen=True)
class BackboneReference:
    """The backbone architectures a grounder was built from, for counting the paper's denominator."""

    vision: VisionSettings
    text: TextSettings
    image_size: int

    def size(self) -> int:
        """Parameters of the released text encoder (BERT: with its pooler) + the ViT without registers
        (DINOv2: with the mask token its released model carries and timm omits); built on the meta device."""
        with torch.device("meta"):
            text = text_model(text_config(self.text), pooler=text_family(self.text.arch).reference_pooler)
            vit = timm.create_model(
                self.vision.arch, pretrained=False, img_size=self.image_size, num_classes=0,
                **{**self.vision.overrides(), "reg_tokens": 0, "no_embed_class": False},
            )
        mask_token = vit.embed_dim if "dinov2" in self.vision.arch else 0
        return count(text) + count(vit) + mask_token


def count(module: nn.Module, trainable: bool | None = None) -> int:
    """Number of parameters, optionally only the trainable (True) or frozen (False) ones."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
