"""Backbone wrappers: a timm ViT (DINOv2 by default), a transformers text encoder (BERT by default) and a
CLIP text prior.

Each backbone is built from explicit architecture settings so that `pretrained: false` needs no hub
access (tests and the synthetic job), and from the hub or a local path when `pretrained: true`. Each
encoder declares its layers and their roles (src/models/roles.py), where PEFT methods place themselves,
and marks the modules it was built with, so that those a method injects later are told apart.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    MODEL_MAPPING,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PretrainedConfig,
    PreTrainedModel,
)

from src.errors import ConfigError
from src.models.roles import LayerRoles, TextFamily, text_family, timm_arch, vision_roles
from src.models.row_cache import PriorCache, RowCache, run_context


@dataclass
class VisionSettings:
    """A timm ViT: `arch` names the architecture, the other fields override its sizes."""

    arch: str = "vit_base_patch14_reg4_dinov2"
    # Pretrained source when the model is built pretrained: a timm tag (e.g. "lvd142m"), a local
    # checkpoint file, or null for timm's default tag of `arch`.
    weights: str | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    reg_tokens: int | None = None
    init_values: float | None = None
    # Position table of a randomly initialised ViT: "timm" keeps timm's init (std 0.02, which leaves
    # frozen random features almost position-blind); "sincos" writes a fixed 2D sin-cos table (as MAE
    # does). Ignored when pretrained weights are loaded.
    random_pos_embed: str = "timm"
    # A local state dict loaded into the randomly built ViT (e.g. the synthetic pretraining stage's
    # output, src/pretraining/vision.py); independent of model.pretrained.
    init_checkpoint: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The architecture overrides that are set, as timm keyword arguments."""
        names = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "reg_tokens", "init_values")  # timm's
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class TextSettings:
    """A transformers text encoder: `arch` its family (a model_type: bert, roberta, distilbert, ...),
    `config` its architecture over the family's defaults, `weights` a hub id or local folder used when
    built pretrained (they must fit that architecture)."""

    arch: str = "bert"
    weights: str = "bert-base-uncased"
    config: dict[str, Any] = field(default_factory=dict)
    # A local state dict loaded into the built text encoder (e.g. src/pretraining/text.py's output).
    init_checkpoint: str | None = None


@dataclass
class PriorSettings:
    """The CLIP text tower used as a frozen per-token prior; `weights` as for `TextSettings`."""

    weights: str = "openai/clip-vit-base-patch16"
    config: dict[str, Any] = field(default_factory=dict)
    # A local state dict loaded into the built CLIP text tower (e.g. src/pretraining/text.py's output).
    init_checkpoint: str | None = None


CLIP_B16_TEXT = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=512, bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
)


class VisionEncoder(nn.Module):
    """A timm ViT whose output keeps the class token and the patch tokens (registers are dropped).

    With `prefix_cache` entries, the output of its frozen prefix (the stem and the leading blocks that
    nothing tunes, `frozen_prefix_depth`) is kept per image for inputs that come with an `image_key`
    (a digest of the image tensor, which the data layer gives samples it serves from memory) and read
    back the next time that image comes: below the first tuned block nothing changes during training.
    """

    def __init__(self, vit: nn.Module, prefix_cache: int = 0, cache_max_bytes: int | None = None) -> None:
        super().__init__()
        self.roles: LayerRoles = vision_roles(vit)
        if getattr(vit, "cls_token", None) is None:
            raise ConfigError(f"model.vision.arch={timm_arch(vit)!r} has no class token, which the grounder passes on")
        self.vit = vit
        mark_built_with_backbone(vit)
        self.prefix_cache = RowCache(prefix_cache, cache_max_bytes) if prefix_cache else None

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus registers, as they sit in front of the patches inside the ViT."""
        return self.vit.num_prefix_tokens

    @property
    def num_output_tokens(self) -> int:
        """Tokens handed to the fusion: the class token and every patch."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def layers(self) -> nn.Sequential:
        """The ViT's blocks, the layers its roles are resolved in."""
        return self.vit.blocks

    def frozen_prefix_depth(self) -> int:
        """How many leading blocks, after the stem, compute a fixed function of the image: modules built
        with the ViT (nothing injected), without trainable parameters, not in training mode. 0 when the
        stem itself (patch embedding, class, register or distillation tokens, positions) is not fixed."""
        vit = self.vit
        stem = [vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre]
        if any(t.requires_grad for t in vit.parameters(recurse=False)) or not all(_fixed(m) for m in stem):
            return 0
        depth = 0
        while depth < len(vit.blocks) and _fixed(vit.blocks[depth]):
            depth += 1
        return depth

    def forward(self, image: torch.Tensor, image_key: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + H*W, D) tokens; `image_key` (B,) lets the frozen prefix's output be cached per image."""
        depth = self.frozen_prefix_depth() if self.prefix_cache is not None and image_key is not None else 0
        if depth:
            context = (run_context(image.device), next(self.vit.patch_embed.parameters()).dtype, depth)
            keys = [(context, key) for key in image_key.tolist()]
            x = self.prefix_cache.lookup(keys, lambda index: self._prefix(image[index.to(image.device)], depth),
                                         weights=self._prefix_weights(depth))
            for block in self.vit.blocks[depth:]:
                x = block(x)
            tokens = self.vit.norm(x)
        else:
            tokens = self.vit.forward_features(image)
        return torch.cat([tokens[:, :1], tokens[:, self.num_prefix_tokens :]], dim=1)

    def _prefix_weights(self, depth: int) -> Iterator[torch.Tensor]:
        """Every tensor the frozen prefix's output depends on: the stem's and the first `depth` blocks'."""
        vit = self.vit
        yield from vit.parameters(recurse=False)  # the tokens and the position table
        for module in (vit.patch_embed, vit.norm_pre, *vit.blocks[:depth]):
            yield from module.parameters()
            yield from module.buffers()

    @torch.no_grad()
    def _prefix(self, image: torch.Tensor, depth: int) -> torch.Tensor:
        """The stem and the first `depth` blocks, as timm's forward_features runs them."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image))))
        for block in vit.blocks[:depth]:
            x = block(x)
        return x


def _fixed(module: nn.Module) -> bool:
    """True when `module` computes a fixed function: built with the backbone, frozen, not training."""
    return all(built_with_backbone(m) and not m.training for m in module.modules()) and not any(
        p.requires_grad for p in module.parameters()
    )


def mark_built_with_backbone(backbone: nn.Module) -> None:
    """Mark every module of a freshly built backbone: modules a PEFT method injects later lack the mark (they
    keep training mode while the frozen backbone's are off, and they end the ViT's frozen prefix)."""
    for module in backbone.modules():
        module.built_with_backbone = True


def built_with_backbone(module: nn.Module) -> bool:
    """Whether `module` came with its backbone (`mark_built_with_backbone`), not with a PEFT method."""
    return getattr(module, "built_with_backbone", False)


class ZeroTokenType(nn.Module):
    """Stands in for a token-type table when the official model has none (as the official BERT): adds exactly zero."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # follows the module's dtype (model.to(torch.bfloat16) included), so the zeros match the embeddings
        self.register_buffer("dtype_probe", torch.zeros(()), persistent=False)

    def forward(self, token_type_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*token_type_ids.shape, self.dim, device=token_type_ids.device, dtype=self.dtype_probe.dtype)


class TextEncoder(nn.Module):
    """A transformers encoder returning per-token features (B, L, D); adapters inside may read `condition`.

    The model is held as `bert` whatever its family: checkpoints name the text weights `text.bert.*`.
    """

    def __init__(self, bert: PreTrainedModel) -> None:
        super().__init__()
        arch = bert.config.model_type
        self.family: TextFamily = text_family(arch)
        self.roles: LayerRoles = LayerRoles(arch, self.family.roles)
        self.bert = bert
        mark_built_with_backbone(bert)
        self.condition: ConditionSlot = ConditionSlot()

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's layers, the ones its roles are resolved in."""
        return self.bert.get_submodule(self.family.layers)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        token_types = {"token_type_ids": torch.zeros_like(ids)} if self.family.token_types else {}
        with self.condition.holding(condition):
            out = self.bert(input_ids=ids, attention_mask=mask, **token_types)
        return out.last_hidden_state


class ConditionSlot:
    """Carries a per-forward conditioning tensor (the CLIP prior) to adapters deep inside a backbone."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    @contextmanager
    def holding(self, value: torch.Tensor | None) -> Iterator[None]:
        self.value = value
        try:
            yield
        finally:
            self.value = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("a prior-conditioned adapter ran without a prior")
        return self.value


class TextPrior(nn.Module):
    """Frozen CLIP text tower: per-token features after the final LayerNorm, projected (B, L, P)."""

    def __init__(
        self, clip: CLIPTextModelWithProjection, use_padding_mask: bool = True, fp16: bool = False, cache_size: int = 0,
        cache_max_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.clip = clip
        mark_built_with_backbone(clip)
        self.use_padding_mask = use_padding_mask
        self.fp16 = fp16  # fp16 autocast on CUDA, as the official GPU run (the prior_fp16 quirk)
        # the prior of recently seen phrases (model.prior_cache entries; 0 = none), cleared when the weights change
        self.cache = PriorCache(cache_size, cache_max_bytes) if cache_size else None

    @property
    def dim(self) -> int:
        return self.clip.config.projection_dim

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        limit = self.clip.config.max_position_embeddings
        if ids.shape[1] > limit:
            raise ValueError(f"query length {ids.shape[1]} exceeds CLIP's {limit} positions")
        attention_mask = mask if self.use_padding_mask else None
        if self.cache is not None:
            return self.cache(ids, attention_mask, self._compute, weights=self.clip.parameters())
        return self._compute(ids, attention_mask)

    def _compute(self, ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        half = self.fp16 and ids.is_cuda
        with torch.autocast("cuda", dtype=torch.float16) if half else nullcontext():
            hidden = self.clip.text_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            return self.clip.text_projection(hidden)


def build_vit(settings: VisionSettings, image_size: int, pretrained: bool, drop_registers: bool) -> nn.Module:
    """Create the timm ViT at `image_size`; without registers when `drop_registers` (official mode)."""
    kwargs: dict[str, Any] = dict(img_size=image_size, num_classes=0, **settings.overrides())
    if not drop_registers:
        vit = _create_timm(settings, pretrained, **kwargs)
    else:
        vit = timm.create_model(settings.arch, pretrained=False, **{**kwargs, "reg_tokens": 0, "no_embed_class": False})
        if pretrained:
            load_without_registers(vit, _create_timm(settings, True, **kwargs).state_dict())
    if not pretrained and settings.random_pos_embed != "timm":
        set_sincos_positions(vit, settings.random_pos_embed)
    load_checkpoint(vit, settings.init_checkpoint)
    return vit


def set_sincos_positions(vit: nn.Module, kind: str) -> None:
    """Overwrite a random ViT's patch position rows with a fixed 2D sin-cos table (class slot zero)."""
    if kind != "sincos":
        raise ConfigError(f"vision.random_pos_embed must be 'timm' or 'sincos', got {kind!r}")
    table = build_sincos2d_pos_embed(list(vit.patch_embed.grid_size), vit.embed_dim)
    with torch.no_grad():
        vit.pos_embed.zero_()
        vit.pos_embed[0, vit.pos_embed.shape[1] - table.shape[0] :] = table


def _create_timm(settings: VisionSettings, pretrained: bool, **kwargs: Any) -> nn.Module:
    name, overlay = settings.arch, {}
    if pretrained and settings.weights:
        if Path(settings.weights).is_file():
            overlay = {"pretrained_cfg_overlay": {"file": settings.weights}}
        else:
            name = f"{settings.arch}.{settings.weights}"
    return timm.create_model(name, pretrained=pretrained, **overlay, **kwargs)


def load_without_registers(plain: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a timm register-ViT's weights into the same ViT built without registers (official quirk).

    timm folds the class token's position into `cls_token` for register models, so the class slot of
    the plain model's position table is zero: the class token still gets exactly cls + pos[0].
    """
    state = {k: v for k, v in state.items() if k != "reg_token"}
    pos = state["pos_embed"]
    if pos.shape[1] == plain.pos_embed.shape[1] - 1:
        state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
    plain.load_state_dict(state, strict=True)


def text_config(settings: TextSettings) -> PretrainedConfig:
    """The text encoder's architecture: its family's defaults (BERT: bert-base-uncased's), updated by the
    configured overrides, each of which must be a setting of the family's config class (names differ
    between families: DistilBERT's FFN width is `hidden_dim`, BERT's `intermediate_size`)."""
    family = text_family(settings.arch)
    config_class = CONFIG_MAPPING[settings.arch]
    known = {*inspect.signature(config_class.__init__).parameters, *PretrainedConfig().to_dict(),
             *config_class.attribute_map}
    unknown = sorted(set(settings.config) - known)
    if unknown:
        raise ConfigError(f"model.text.config.{unknown[0]} is not a setting of {config_class.__name__} "
                          f"(model.text.arch={settings.arch})")
    return config_class(**{**family.base, **settings.config})


def text_model(config: PretrainedConfig, pooler: bool = False) -> PreTrainedModel:
    """A random text encoder of `config`'s family, with its pooler only when asked (and it has one)."""
    return MODEL_MAPPING[type(config)](config, **text_family(config.model_type).pooler_kwargs(pooler))


def build_text(settings: TextSettings, pretrained: bool, token_type: bool) -> PreTrainedModel:
    """The text encoder without pooler; `token_type=False` swaps its token-type table, where it has one, for
    zeros (the official BERT has none)."""
    config, family = text_config(settings), text_family(settings.arch)
    if pretrained:
        model_class = MODEL_MAPPING[type(config)]
        model, info = model_class.from_pretrained(settings.weights, config=config, output_loading_info=True,
                                                  **family.pooler_kwargs(False))
        if info["missing_keys"]:  # transformers would leave them random with a warning
            missing = sorted(info["missing_keys"])
            raise ConfigError(f"model.text.weights={settings.weights!r} lacks {len(missing)} weights of the configured "
                              f"{settings.arch} encoder (e.g. {missing[0]}): weights of another family or size?")
    else:
        model = text_model(config)
    if not token_type and family.token_types:
        model.embeddings.token_type_embeddings = ZeroTokenType(config.hidden_size)
    load_checkpoint(model, settings.init_checkpoint)
    return model


def clip_config(settings: PriorSettings) -> CLIPTextConfig:
    """The CLIP text architecture: ViT-B/16's text tower, updated by the configured overrides."""
    return CLIPTextConfig(**{**CLIP_B16_TEXT, **settings.config})


# Seed of the random CLIP text blocks of the `prior_random_blocks` quirk.
RANDOM_BLOCKS_SEED = 0


def build_clip_text(
    settings: PriorSettings, pretrained: bool, random_blocks: bool = False
) -> CLIPTextModelWithProjection:
    """Only CLIP's text tower and its projection are built (the image tower would be dead weight).

    `random_blocks` (the official loader's behaviour) re-initialises the transformer blocks of a
    pretrained tower with CLIP's own init scheme from a fixed seed, keeping its embeddings, final
    LayerNorm and projection.
    """
    config = clip_config(settings)
    if pretrained:
        clip = CLIPTextModelWithProjection.from_pretrained(settings.weights, config=config)
        if random_blocks:
            randomise_clip_blocks(clip, RANDOM_BLOCKS_SEED)
    else:
        clip = CLIPTextModelWithProjection(config)
    load_checkpoint(clip, settings.init_checkpoint)
    return clip


@torch.no_grad()
def randomise_clip_blocks(clip: CLIPTextModelWithProjection, seed: int) -> None:
    """Re-draw every text transformer block as OpenAI CLIP initialises them (`initialize_parameters`):
    q/k/v std width^-0.5, attention output and MLP output std width^-0.5 (2 layers)^-0.5, MLP input
    std (2 width)^-0.5, attention biases 0, MLP biases nn.Linear's uniform, LayerNorms 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    width, layers = clip.config.hidden_size, clip.config.num_hidden_layers
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5

    def normal(linear: nn.Linear, std: float) -> None:
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * std)

    def uniform_bias(linear: nn.Linear) -> None:
        bound = linear.in_features**-0.5
        linear.bias.copy_((torch.rand(linear.bias.shape, generator=g) * 2 - 1) * bound)

    for layer in clip.text_model.encoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
            normal(linear, attn_std)
            linear.bias.zero_()
        normal(attention.out_proj, proj_std)
        attention.out_proj.bias.zero_()
        normal(mlp.fc1, fc_std)
        uniform_bias(mlp.fc1)
        normal(mlp.fc2, proj_std)
        uniform_bias(mlp.fc2)
        for norm in (layer.layer_norm1, layer.layer_norm2):
            norm.weight.fill_(1.0)
            norm.bias.zero_()


def load_checkpoint(module: nn.Module, path: str | None) -> None:
    """Load a local state dict (strictly) into a freshly built backbone; nothing when `path` is None."""
    if path:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
