"""The grounder: image + phrase -> one box. Backbones, optional CLIP prior, PEFT modules, fusion, head."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from src.errors import ConfigError
from src.models.checkpointing import checkpoint_blocks, checkpointing_mode
from src.models.encoders import (
    PriorSettings,
    TextEncoder,
    TextPrior,
    TextSettings,
    VisionEncoder,
    VisionSettings,
    build_clip_text,
    build_text,
    build_vit,
    built_with_backbone,
)
from src.models.fusion import BoxHead, FusionEncoder
from src.models.peft.base import PeftMethod
from src.models.reference import BackboneReference
from src.quirks import ModelQuirks


@dataclass
class FusionSettings:
    """Width, heads, FFN width, depth and dropout of the vision-language fusion transformer."""

    dim: int = 256
    heads: int = 8
    ffn_dim: int = 2048
    layers: int = 6
    dropout: float = 0.1


@dataclass
class GrounderOutput:
    """Predicted (cx, cy, w, h) boxes in [0, 1] of the padded canvas, and optional intermediates."""

    boxes: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class Grounder(nn.Module):
    """MaPPER-shaped REC model; which parts train is decided by the PEFT method it was built with."""

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        prior: TextPrior | None,
        fusion: FusionSettings,
        max_query_len: int,
        quirks: ModelQuirks,
        adapter_layers: dict[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.vision, self.text, self.prior = vision, text, prior
        self.quirks = quirks
        self.max_query_len = max_query_len
        self.adapter_layers = dict(adapter_layers or {})
        # Merges the text features with the prior before the fusion, where a method sets one (MaPPER's PGT).
        self.text_merge: nn.Module | None = None
        d = fusion.dim
        self.visu_proj = nn.Linear(vision.embed_dim, d)
        self.text_proj = nn.Linear(text.hidden_size, d)
        self.reg_token = nn.Embedding(1, d)
        self.pos_embed = nn.Embedding(1 + max_query_len + vision.num_output_tokens, d)
        nn.init.normal_(self.pos_embed.weight, std=1.0 if quirks.unit_normal_fusion_positions else 0.02)
        self.fusion = FusionEncoder(d, fusion.heads, fusion.ffn_dim, fusion.layers, fusion.dropout)
        self.head = BoxHead(d)
        self.tunable_backbone_names: list[str] = []
        self.backbones_frozen = True
        # Blocks whose activations are recomputed in backward (model.checkpointing).
        self.checkpointed_blocks: list[str] = []
        # The backbone architectures this model was built from (for the parameter report).
        self.reference: BackboneReference | None = None
        # Frozen backbone weights stored in bf16 (model.frozen_bf16): the backbones then run under bf16 autocast.
        self.frozen_bf16 = False

    @property
    def backbone_modules(self) -> list[tuple[nn.Module, bool]]:
        """The backbones' own modules, each with whether it is in the text encoder; not those a PEFT method
        brought (e.g. LoRA's: they keep training mode). Found by their marks: injection renames modules."""
        parts = ((self.vision, False), (self.text, True), (self.prior, False))
        return [(m, in_text) for part, in_text in parts if part is not None
                for m in part.modules() if built_with_backbone(m)]

    def apply_peft(self, method: PeftMethod) -> None:
        """Freeze the backbones and the prior, then let `method` inject and unfreeze what it trains."""
        for backbone in (self.vision, self.text, self.prior):
            if backbone is not None:
                backbone.requires_grad_(False)
        tunable = method.inject(self)
        self.backbones_frozen = method.freezes_backbones
        ids = {id(p) for m in tunable for p in m.parameters()}
        self.tunable_backbone_names = [n for n, p in self.named_parameters() if id(p) in ids]

    def unused_trainable_parameters(self) -> list[str]:
        """Trainable parameters that no forward pass uses (their modules say so by `never_in_forward`,
        e.g. the official DyPA's dead CLIP projection): DDP must be told to look for unused parameters."""
        return [
            f"{name}.{param_name}"
            for name, module in self.named_modules() if getattr(module, "never_in_forward", False)
            for param_name, param in module.named_parameters() if param.requires_grad
        ]

    # --- forward ----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Grounder:
        """Frozen backbones run in eval mode in clean mode: no dropout of any kind, attention dropout
        included, which BERT and timm apply by their attention module's own `training` flag, not by a
        Dropout module (the official code keeps BERT in training mode). Each backbone module is switched
        by itself, so that the modules a PEFT method injected into it keep training mode."""
        super().train(mode)
        if mode and self.backbones_frozen:
            frozen_text_dropout = self.quirks.frozen_text_dropout
            for module, in_text in self.backbone_modules:
                module.training = in_text and frozen_text_dropout
        return self

    def patch_padding(self, pixel_mask: torch.Tensor) -> torch.Tensor:
        """(B, S, S) pixel padding -> (B, 1 + H*W) token padding, the class token never padded."""
        grid = self.vision.grid
        m = pixel_mask[:, None].float()
        if self.quirks.nearest_patch_mask:
            patches = F.interpolate(m, size=grid) > 0.5  # top-left pixel of each patch decides
        else:
            patches = F.adaptive_avg_pool2d(m, grid) > 1 - 1e-6  # padding only when wholly padded
        patches = patches.flatten(1)
        return torch.cat([patches.new_zeros(patches.shape[0], 1), patches], dim=1)

    def forward(
        self,
        image: torch.Tensor,
        pixel_mask: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        prior_ids: torch.Tensor | None = None,
        prior_mask: torch.Tensor | None = None,
        return_features: bool = False,
        image_key: torch.Tensor | None = None,
    ) -> GrounderOutput:
        if text_ids.shape[1] != self.max_query_len:
            raise ValueError(f"text length {text_ids.shape[1]} != model.max_query_len {self.max_query_len}")
        with torch.autocast(image.device.type, dtype=torch.bfloat16) if self.frozen_bf16 else nullcontext():
            visual = self.vision(image, image_key)
            prior = self._prior(text_ids, text_mask, prior_ids, prior_mask)
            text = self.text(text_ids, text_mask, condition=prior)
            bert_out = text
            if self.text_merge is not None:
                text = self.text_merge(text, prior)
        if self.frozen_bf16:  # the projections' fp32 weights take fp32 input outside an autocast region
            visual, text = visual.float(), text.float()
        b = image.shape[0]
        tokens = torch.cat(
            [self.reg_token.weight.expand(b, -1, -1), self.text_proj(text), self.visu_proj(visual)], dim=1
        )
        padding = torch.cat(
            [text_mask.new_zeros(b, 1, dtype=torch.bool), text_mask == 0, self.patch_padding(pixel_mask)], dim=1
        )
        key_padding = padding.to(tokens.dtype) if self.quirks.additive_fusion_mask else padding
        fused = self.fusion(tokens, self.pos_embed.weight[None], key_padding)
        boxes = self.head(fused[:, 0])
        features = {}
        if return_features:
            features = {"visual": visual, "bert": bert_out, "pgt": text, "vl_reg": fused[:, 0]}
            if prior is not None:
                features["clip_prior"] = prior
        return GrounderOutput(boxes=boxes, features=features)

    def _prior(self, text_ids, text_mask, prior_ids, prior_mask) -> torch.Tensor | None:
        if self.prior is None:
            return None
        if self.quirks.prior_from_bert_ids:
            ids, mask = text_ids, None
        else:
            if prior_ids is None:
                raise ValueError("the CLIP prior needs `prior_ids` (CLIP tokens) in clean mode")
            ids, mask = prior_ids, prior_mask
        with torch.no_grad():  # the prior is frozen and nothing trainable feeds it
            return self.prior(ids, mask).float()

    def store_frozen_weights_in_bf16(self) -> None:
        """Keep every frozen floating-point backbone parameter in bf16 (half the memory, no per-forward cast
        under autocast); trainable parameters and all buffers stay as they are."""
        for backbone in (self.vision, self.text, self.prior):
            for p in backbone.parameters() if backbone is not None else ():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        self.frozen_bf16 = True

    # --- bookkeeping ------------------------------------------------------------------------------
    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: inside the vision backbone, inside the text backbone, the rest."""
        groups: dict[str, list[nn.Parameter]] = {"vision": [], "text": [], "head": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            role = "vision" if name.startswith("vision.") else "text" if name.startswith("text.") else "head"
            groups[role].append(p)
        return groups


def build_grounder(
    peft: PeftMethod,
    mode: str = "clean",
    pretrained: bool = False,
    image_size: int = 518,
    max_query_len: int = 20,
    vision: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    prior: dict[str, Any] | None = None,
    fusion: dict[str, Any] | None = None,
    adapter_layers: dict[str, Sequence[int]] | None = None,
    quirks: dict[str, bool | None] | None = None,
    checkpointing: bool | str | None = False,
    frozen_bf16: bool = False,
    prior_cache: int = 0,
    vision_prefix_cache: int = 0,
    cache_max_mb: float | None = 1024,
    compile: bool = False,
) -> Grounder:
    """Build the grounder from plain settings (what Hydra passes) and apply the PEFT method.

    `pretrained=False` builds every backbone from its architecture settings with random weights and
    touches no network; `adapter_layers` is the default placement for methods that leave theirs unset;
    `quirks` sets single official quirks against the mode's defaults; `checkpointing` (false, frozen = true,
    all) recomputes blocks' activations in backward instead of storing them (src/models/checkpointing.py);
    `frozen_bf16` stores the frozen backbone weights in bf16 and runs the backbones under bf16 autocast;
    `prior_cache` keeps the CLIP prior of that many recent phrases (src/models/row_cache.py);
    `vision_prefix_cache` keeps the output of the ViT's frozen prefix for that many recent images (inputs
    with an `image_key`: samples the data layer serves from memory); each of the two caches holds at most
    `cache_max_mb` MiB (null: no byte bound, only the entry counts);
    `compile` compiles the grounder's forward with torch.compile (in place: state-dict keys unchanged).
    """
    quirks = ModelQuirks.resolve(mode, quirks)
    max_bytes = int(cache_max_mb * 2**20) if cache_max_mb else None
    vs, ts, ps = VisionSettings(**(vision or {})), TextSettings(**(text or {})), PriorSettings(**(prior or {}))
    vit = build_vit(vs, image_size, pretrained, drop_registers=quirks.drop_vision_registers)
    if image_size % vit.patch_embed.patch_size[0]:
        raise ConfigError(f"image_size {image_size} is not a multiple of the patch size {vit.patch_embed.patch_size}")
    text_backbone = build_text(ts, pretrained, token_type=not quirks.bert_without_token_type)
    clip = None
    if peft.uses_prior:
        clip = TextPrior(build_clip_text(ps, pretrained, random_blocks=quirks.prior_random_blocks),
                         use_padding_mask=not quirks.prior_from_bert_ids, fp16=quirks.prior_fp16,
                         cache_size=prior_cache, cache_max_bytes=max_bytes)
    vision_encoder = VisionEncoder(vit, prefix_cache=vision_prefix_cache, cache_max_bytes=max_bytes)
    model = Grounder(
        vision_encoder, TextEncoder(text_backbone), clip, FusionSettings(**(fusion or {})), max_query_len, quirks,
        adapter_layers,
    )
    model.reference = BackboneReference(vs, ts, image_size)
    model.apply_peft(peft)
    if frozen_bf16:
        model.store_frozen_weights_in_bf16()
    chosen = checkpointing_mode(checkpointing)
    if chosen:
        blocks = {"vision": model.vision.layers, "text": model.text.layers}
        if chosen == "all":
            blocks["fusion"] = model.fusion.layers
        model.checkpointed_blocks = checkpoint_blocks(blocks, chosen == "frozen", slots=[model.text.condition])
    if compile:
        model.compile()
    return model
