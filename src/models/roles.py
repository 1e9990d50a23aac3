"""Roles: the parts of one backbone layer that PEFT methods place themselves at, named by what they do.

A method or a config names a role (`attn_qkv`, `mlp_out`, `mlp`, ...); each backbone family resolves it
to module paths inside one of its layers. Vision families are keyed by their timm block class, text
families by their transformers `model_type`, so that any timm ViT and any HF encoder of a known layout
serves every method; an unknown family is a ConfigError naming the model.

| role | what it is |
|---|---|
| attn_q, attn_k, attn_v | the query / key / value projection (a fused qkv Linear where the family fuses them) |
| attn_qkv | every query, key and value projection (one fused Linear or three) |
| attn_out | the attention's output projection |
| mlp_in, mlp_out | the MLP's first and last Linear |
| mlp | the whole MLP `x -> f` whose output the layer adds to its residual (ViT, DistilBERT) |
| mlp_norm | the LayerNorm a post-norm layer applies to `f + x` (DistilBERT) |
| ffn_output | BERT's FFN output block `(h, x) -> LayerNorm(dropout(dense(h)) + x)` (BERT-like) |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn

from src.errors import ConfigError

ROLES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "mlp", "mlp_norm", "ffn_output")


@dataclass(frozen=True)
class LayerRoles:
    """Where each role sits inside one layer of a family: role -> module paths relative to the layer."""

    family: str
    paths: Mapping[str, tuple[str, ...]]

    def has(self, role: str) -> bool:
        return role in self.paths

    def resolve(self, targets: Sequence[str], layer: nn.Module, key: str) -> list[str]:
        """Module paths for `targets`, each a role or a path inside the layer (as older configs wrote them);
        duplicates (attn_q and attn_k on a fused qkv) once, in order. `key` names the setting in errors."""
        paths: list[str] = []
        for target in targets:
            if target in self.paths:
                found = self.paths[target]
            elif target not in ROLES and _has_module(layer, target):
                found = (target,)
            else:
                known = ", ".join(r for r in ROLES if r in self.paths)
                raise ConfigError(f"{key}: {target!r} is neither a role of {self.family} layers ({known}) "
                                  "nor a module inside one")
            paths += [p for p in found if p not in paths]
        return paths

    def wrap(self, layer: nn.Module, role: str, make: Callable[[nn.Module], nn.Module]) -> None:
        """Put `make(module)` in place of the one module that plays `role` in `layer`."""
        if role not in self.paths:
            raise ConfigError(f"{self.family} layers have no {role!r} part to place this adapter at")
        (path,) = self.paths[role]
        layer.set_submodule(path, make(layer.get_submodule(path)))


def _has_module(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


# --- vision: timm ViT blocks ------------------------------------------------------------------------------
TIMM_BLOCK_ROLES = {
    "attn_q": ("attn.qkv",), "attn_k": ("attn.qkv",), "attn_v": ("attn.qkv",), "attn_qkv": ("attn.qkv",),
    "attn_out": ("attn.proj",), "mlp_in": ("mlp.fc1",), "mlp_out": ("mlp.fc2",), "mlp": ("mlp",),
}
VISION_BLOCKS: dict[type[nn.Module], dict[str, tuple[str, ...]]] = {
    Block: TIMM_BLOCK_ROLES,  # pre-norm blocks: DINOv2, DeiT, CLIP / SigLIP towers, plain ViTs
    ResPostBlock: TIMM_BLOCK_ROLES,  # post-norm blocks
}


def timm_arch(vit: nn.Module) -> str:
    """The timm architecture name a model was created as (its class name when built directly)."""
    return (getattr(vit, "pretrained_cfg", None) or {}).get("architecture", type(vit).__name__)


def vision_roles(vit: nn.Module) -> LayerRoles:
    """The roles of a timm ViT's blocks; a ConfigError naming the model when its layout is not known."""
    arch = timm_arch(vit)
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(f"model.vision.arch={arch!r} is a timm {type(vit).__name__}, not a VisionTransformer "
                          "(the vision encoder needs its patch embedding, tokens and blocks)")
    block = type(vit.blocks[0])
    if block not in VISION_BLOCKS:
        known = ", ".join(b.__name__ for b in VISION_BLOCKS)
        raise ConfigError(f"model.vision.arch={arch!r} is built from timm {block.__name__} blocks, whose parts "
                          f"have no roles yet (known blocks: {known})")
    return LayerRoles(f"timm {block.__name__}", VISION_BLOCKS[block])


# --- text: transformers encoders ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TextFamily:
    """How the suite builds and drives one transformers encoder family, and its layers' roles."""

    layers: str  # the layer list's path inside the model
    roles: dict[str, tuple[str, ...]]
    pooler_argument: bool  # the model class takes `add_pooling_layer` (the grounder builds it without)
    reference_pooler: bool  # the released model ships its pooler, so the parameter reference counts it
    token_types: bool  # the model reads `token_type_ids` (from a token-type table)
    base: dict[str, Any] = field(default_factory=dict)  # config values under `model.text.config`

    def pooler_kwargs(self, pooler: bool) -> dict[str, bool]:
        """The model class's keyword for building it with or without its pooler (none if it has no pooler)."""
        return {"add_pooling_layer": pooler} if self.pooler_argument else {}


BERT_LAYER = {
    "attn_q": ("attention.self.query",), "attn_k": ("attention.self.key",), "attn_v": ("attention.self.value",),
    "attn_qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn_out": ("attention.output.dense",), "mlp_in": ("intermediate.dense",), "mlp_out": ("output.dense",),
    "ffn_output": ("output",),
}
DISTILBERT_LAYER = {
    "attn_q": ("attention.q_lin",), "attn_k": ("attention.k_lin",), "attn_v": ("attention.v_lin",),
    "attn_qkv": ("attention.q_lin", "attention.k_lin", "attention.v_lin"), "attn_out": ("attention.out_lin",),
    "mlp_in": ("ffn.lin1",), "mlp_out": ("ffn.lin2",), "mlp": ("ffn",), "mlp_norm": ("output_layer_norm",),
}
# bert-base-uncased's architecture, what MaPPER uses (transformers' BertConfig defaults, written out)
BERT_BASE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, hidden_act="gelu",
)


def _bert_like(pooler: bool, reference_pooler: bool = False, base: dict[str, Any] | None = None) -> TextFamily:
    """A family laid out as BERT (encoder.layer, BertOutput-style FFN block, token types)."""
    return TextFamily("encoder.layer", BERT_LAYER, pooler, reference_pooler, True, base or {})


TEXT_FAMILIES: dict[str, TextFamily] = {
    "bert": _bert_like(pooler=True, reference_pooler=True, base=BERT_BASE),  # the paper counts BERT's pooler
    "roberta": _bert_like(pooler=True),
    "xlm-roberta": _bert_like(pooler=True),
    "camembert": _bert_like(pooler=True),
    "data2vec-text": _bert_like(pooler=True),
    "electra": _bert_like(pooler=False),
    "distilbert": TextFamily("transformer.layer", DISTILBERT_LAYER, False, False, False),
}


def register_text_family(arch: str, family: TextFamily) -> TextFamily:
    """Make the transformers `model_type` `arch` a text backbone every method serves (a plugin's way in)."""
    TEXT_FAMILIES[arch] = family
    return family


def register_vision_block(block: type[nn.Module], roles: Mapping[str, tuple[str, ...]]) -> None:
    """Give the timm block class `block` its roles, so that ViTs built from it serve every method."""
    VISION_BLOCKS[block] = dict(roles)


def text_family(arch: str) -> TextFamily:
    """The family called `arch` (a transformers model_type); a ConfigError naming it when unknown."""
    if arch not in TEXT_FAMILIES:
        raise ConfigError(f"model.text.arch={arch!r} is not a text encoder family the suite has roles for; "
                          f"known: {', '.join(TEXT_FAMILIES)}")
    return TEXT_FAMILIES[arch]
