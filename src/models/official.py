"""Official MaPPER checkpoints -> the suite's Grounder (official mode).

The official model (liuting20/MaPPER) names its parts `visumodel` (DINOv2 + LoCA), `textmodel.bert`
(BERT + DyPA), `textmodel_clip.clip` (the whole OpenAI CLIP), `text_adapter` (PGT), `vl_transformer`
and `bbox_embed`. `RULES` below is the whole mapping: one row per official key family, read top to
bottom, the first full match wins. A row either renames (a template filled from the pattern's named
groups, optionally with a tensor transform) or drops the key, saying why dropping it is safe.

Two template fields depend on where the adapters sit, because the suite wraps the module an adapter
attaches to: `{mlp}` is `mlp.mlp` in a ViT block with LoCA (else `mlp`), and `{output}` is
`output.output` in a BERT layer with DyPA (else `output`). Which blocks and layers have adapters is
read from the official checkpoint itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from src.errors import UserError
from src.models.grounder import Grounder, build_grounder
from src.models.peft.mapper import Mapper

Transform = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _same(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t,)


def _split_qkv(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A packed MultiheadAttention in-projection (rows [q; k; v]) -> separate q, k, v."""
    return tuple(part.clone() for part in t.chunk(3, dim=0))


def _transpose(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """CLIP's `x @ text_projection` stores (in, out); a Linear weight is (out, in)."""
    return (t.t().contiguous(),)


@dataclass(frozen=True)
class Rule:
    """One official key family: `pattern` (full-match regex) -> suite key template(s), or dropped.

    `target` None drops the key (`why` says why that is safe). A tuple of templates takes one tensor
    each from `transform` (e.g. a packed q/k/v split into three).
    """

    pattern: str
    target: str | tuple[str, ...] | None
    transform: Transform = _same
    why: str = ""
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))


V, T, C = r"visumodel\.", r"textmodel\.bert\.", r"textmodel_clip\.clip\."
VB, TL = V + r"blocks\.(?P<i>\d+)\.", T + r"encoder\.layer\.(?P<i>\d+)\."
CB = C + r"transformer\.resblocks\.(?:resblock_)?(?P<i>\d+)\."
SB, SL = "vision.vit.blocks.{i}.", "text.bert.encoder.layer.{i}."
SC = "prior.clip.text_model."
SCB = SC + "encoder.layers.{i}."

RULES: tuple[Rule, ...] = (
    # DINOv2 ViT-B/14 (no register tokens) -> timm ViT built without registers.
    Rule(V + r"mask_token", None, why="DINOv2's masked-image-modelling token, only used in its pretraining"),
    Rule(V + r"(?P<name>cls_token|pos_embed)", "vision.vit.{name}"),
    Rule(V + r"(?P<rest>patch_embed\.proj\..+|norm\..+)", "vision.vit.{rest}"),
    Rule(VB + r"(?P<rest>(?:norm1|attn|ls1|norm2|ls2)\..+)", SB + "{rest}"),
    Rule(VB + r"mlp\.(?P<rest>.+)", SB + "{mlp}.{rest}"),
    # LoCA (blocks 3, 7, 11): D_fc1/D_fc2 and Conv+BN pairs (BN running stats included).
    Rule(VB + r"adapter\.D_fc(?P<n>[12])\.(?P<p>.+)", SB + "mlp.adapter.fc{n}.{p}"),
    Rule(VB + r"adapter\.branch1\.conv\.(?P<p>.+)", SB + "mlp.adapter.branch1.0.{p}"),
    Rule(VB + r"adapter\.branch1\.bn\.(?P<p>.+)", SB + "mlp.adapter.branch1.1.{p}"),
    Rule(VB + r"adapter\.branch2\.(?P<j>\d+)\.conv\.(?P<p>.+)", SB + "mlp.adapter.branch2.{j}.0.{p}"),
    Rule(VB + r"adapter\.branch2\.(?P<j>\d+)\.bn\.(?P<p>.+)", SB + "mlp.adapter.branch2.{j}.1.{p}"),
    # BERT (no token-type table) + DyPA (layers 3, 7, 11).
    Rule(T + r"embeddings\.position_ids", None,
         why="the index table 0..511; the suite's BERT builds the same position ids itself (checked)"),
    Rule(T + r"(?P<rest>embeddings\..+)", "text.bert.{rest}"),
    Rule(TL + r"crossattention\..+", None, why="BERT cross-attention blocks, never run (no encoder states)"),
    Rule(TL + r"(?P<rest>(?:attention|intermediate)\..+)", SL + "{rest}"),
    Rule(TL + r"output\.(?P<rest>.+)", SL + "{output}.{rest}"),
    Rule(TL + r"dapt_text\.bert_adapter_layer_norm_before\.(?P<p>.+)", SL + "output.adapter.norm.{p}"),
    Rule(TL + r"dapt_text\.clip_adapter_layer_norm_before\.(?P<p>.+)", SL + "output.adapter.prior_norm.{p}"),
    Rule(TL + r"dapt_text\.scale\.(?P<p>.+)", SL + "output.adapter.scale.{p}"),
    Rule(TL + r"dapt_text\.bert_down_proj\.(?P<p>.+)", SL + "output.adapter.down.{p}"),
    Rule(TL + r"dapt_text\.up_proj\.(?P<p>.+)", SL + "output.adapter.up.{p}"),
    # Kept although its forward never uses it: official mode builds it so counts and checkpoints match.
    Rule(TL + r"dapt_text\.clip_down_proj\.(?P<p>.+)", SL + "output.adapter.unused_prior_down.{p}"),
    # CLIP: only the text side is used; OpenAI layout -> transformers CLIPTextModelWithProjection.
    Rule(C + r"visual\..+", None, why="CLIP's image tower: the official model only calls encode_text"),
    Rule(C + r"logit_scale", None, why="CLIP's contrastive temperature: only used for image-text logits"),
    Rule(C + r"token_embedding\.weight", SC + "embeddings.token_embedding.weight"),
    Rule(C + r"positional_embedding", SC + "embeddings.position_embedding.weight"),
    Rule(CB + r"attn\.in_proj_(?P<p>weight|bias)",
         (SCB + "self_attn.q_proj.{p}", SCB + "self_attn.k_proj.{p}", SCB + "self_attn.v_proj.{p}"), _split_qkv),
    Rule(CB + r"attn\.out_proj\.(?P<p>.+)", SCB + "self_attn.out_proj.{p}"),
    Rule(CB + r"ln_(?P<n>[12])\.(?P<p>.+)", SCB + "layer_norm{n}.{p}"),
    Rule(CB + r"mlp\.c_fc\.(?P<p>.+)", SCB + "mlp.fc1.{p}"),
    Rule(CB + r"mlp\.c_proj\.(?P<p>.+)", SCB + "mlp.fc2.{p}"),
    Rule(C + r"ln_final\.(?P<p>.+)", SC + "final_layer_norm.{p}"),
    Rule(C + r"text_projection", "prior.clip.text_projection.weight", _transpose),
    # PGT, projections, fusion transformer, box head.
    Rule(r"text_adapter\.down\.(?P<p>.+)", "text_merge.proj.{p}"),
    Rule(r"(?P<name>visu_proj|text_proj|reg_token)\.(?P<p>.+)", "{name}.{p}"),
    Rule(r"vl_pos_embed\.(?P<p>.+)", "pos_embed.{p}"),
    Rule(r"vl_transformer\.encoder\.layers\.(?P<rest>.+)", "fusion.layers.{rest}"),
    Rule(r"bbox_embed\.layers\.(?P<rest>.+)", "head.layers.{rest}"),
)

# Checks on dropped tensors whose content the suite reproduces instead of loading.
DROP_CHECKS: dict[str, Callable[[torch.Tensor], bool]] = {
    "textmodel.bert.embeddings.position_ids": lambda t: torch.equal(
        t.reshape(-1), torch.arange(t.numel(), dtype=t.dtype)
    ),
}


@dataclass(frozen=True)
class OfficialGeometry:
    """What an official checkpoint fixes about the model: canvas, query length, adapter placement."""

    image_size: int
    patch_size: int
    max_query_len: int
    vision_layers: tuple[int, ...]
    text_layers: tuple[int, ...]


class OfficialConversion(NamedTuple):
    """The suite state dict and every key that did not line up, by kind."""

    state: dict[str, torch.Tensor]
    unmapped: list[str]  # official keys no rule knows: surprising
    missing: list[str]  # suite keys nothing was mapped onto
    dropped: dict[str, str]  # official keys dropped on purpose -> why
    mismatched: list[str]  # "official -> suite: shape a vs b", and failed drop checks / clashes

    def problems(self) -> list[str]:
        """Every reason a strict load of `state` would fail, one human line each."""
        return (
            [f"unmapped official key: {k}" for k in self.unmapped]
            + [f"missing suite key: {k}" for k in self.missing]
            + list(self.mismatched)
        )


class OfficialCheckpointError(UserError, ValueError):
    """An official state dict does not fit the suite model; the message lists every problem."""


def _adapted(official: Mapping[str, torch.Tensor], prefix: str, marker: str) -> tuple[int, ...]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\." + re.escape(marker) + r"\.")
    return tuple(sorted({int(m.group(1)) for k in official if (m := pattern.match(k))}))


def infer_geometry(official: Mapping[str, torch.Tensor]) -> OfficialGeometry:
    """Canvas size, query length and adapter layers, from the checkpoint's shapes and keys.

    DINOv2's `pos_embed` has 1 + (S/p)^2 rows and the fusion's `vl_pos_embed` 1 + L + 1 + (S/p)^2,
    so a RefCOCOg checkpoint (L = 40) is recognised without being told.
    """
    try:
        patch = official["visumodel.patch_embed.proj.weight"].shape[-1]
        vis_tokens = official["visumodel.pos_embed"].shape[1]
        vl_rows = official["vl_pos_embed.weight"].shape[0]
    except KeyError as err:
        raise OfficialCheckpointError(f"not an official MaPPER state dict: no {err.args[0]!r}") from err
    side = math.isqrt(vis_tokens - 1)
    if side * side != vis_tokens - 1:
        raise OfficialCheckpointError(f"visumodel.pos_embed has {vis_tokens} rows, not 1 + a square grid")
    max_query_len = vl_rows - 1 - vis_tokens
    if max_query_len <= 0:
        raise OfficialCheckpointError(f"vl_pos_embed has {vl_rows} rows, too few for {vis_tokens} visual tokens")
    return OfficialGeometry(
        image_size=side * patch, patch_size=patch, max_query_len=max_query_len,
        vision_layers=_adapted(official, "visumodel.blocks.", "adapter"),
        text_layers=_adapted(official, "textmodel.bert.encoder.layer.", "dapt_text"),
    )


def convert_state_dict(
    official: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor] | None = None,
) -> OfficialConversion:
    """Rename (and reshape where needed) an official state dict to the suite's keys via `RULES`.

    With `target` (the suite model's state dict) also lists the suite keys left unfilled and the
    shape mismatches, i.e. everything a strict load would complain about.
    """
    vision_adapted = set(_adapted(official, "visumodel.blocks.", "adapter"))
    text_adapted = set(_adapted(official, "textmodel.bert.encoder.layer.", "dapt_text"))
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unmapped, dropped, mismatched = [], {}, []
    for key, tensor in official.items():
        rule, match = next(((r, m) for r in RULES if (m := r.regex.fullmatch(key))), (None, None))
        if rule is None:
            unmapped.append(key)
            continue
        if rule.target is None:
            dropped[key] = rule.why
            check = DROP_CHECKS.get(key)
            if check is not None and not check(tensor):
                mismatched.append(f"{key}: dropped, but its content differs from what the suite assumes")
            continue
        groups = match.groupdict()
        if "i" in groups:
            i = int(groups["i"])
            groups["mlp"] = "mlp.mlp" if i in vision_adapted else "mlp"
            groups["output"] = "output.output" if i in text_adapted else "output"
        templates = (rule.target,) if isinstance(rule.target, str) else rule.target
        tensors = rule.transform(tensor)
        for template, value in zip(templates, tensors, strict=True):
            name = template.format(**groups)
            if name in state:
                mismatched.append(f"{key} -> {name}: already filled from {source[name]}")
            state[name], source[name] = value, key
    missing = []
    if target is not None:
        missing = [k for k in target if k not in state]
        extra = [k for k in state if k not in target]
        mismatched += [f"{source[k]} -> {k}: no such suite key" for k in extra]
        mismatched += [
            f"{source[k]} -> {k}: shape {tuple(v.shape)} vs suite {tuple(target[k].shape)}"
            for k, v in state.items()
            if k in target and v.shape != target[k].shape
        ]
    return OfficialConversion(state, unmapped, missing, dropped, mismatched)


def load_official(model: Grounder, official: Mapping[str, torch.Tensor]) -> OfficialConversion:
    """Convert `official` and load it strictly into `model`; raises listing every problem at once.

    Tensors take the model's dtypes: official GPU checkpoints hold CLIP in fp16, which loads losslessly.
    """
    target = model.state_dict()
    conversion = convert_state_dict(official, target)
    problems = conversion.problems()
    if problems:
        raise OfficialCheckpointError(
            f"the official state dict does not fit the model ({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
    state = {k: v.to(target[k].dtype) for k, v in conversion.state.items()}
    model.load_state_dict(state, strict=True)
    return conversion


def build_official_grounder(geometry: OfficialGeometry) -> Grounder:
    """A randomly initialised, download-free mode=official MaPPER grounder shaped like the checkpoint."""
    return build_grounder(
        Mapper(),
        mode="official",
        pretrained=False,
        image_size=geometry.image_size,
        max_query_len=geometry.max_query_len,
        vision={"patch_size": geometry.patch_size},
        adapter_layers={"vision": list(geometry.vision_layers), "text": list(geometry.text_layers)},
    )


def drop_reason(key: str) -> str | None:
    """Why `RULES` drops the official `key` (None when it maps the key, or knows no rule for it)."""
    rule = next((r for r in RULES if r.regex.fullmatch(key)), None)
    return rule.why if rule is not None and rule.target is None else None
