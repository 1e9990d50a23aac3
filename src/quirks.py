"""Every behaviour of the official MaPPER code that differs from the paper's intent, in one place.

`model.mode=clean` (default) turns every quirk off; `model.mode=official` turns every quirk on, so
that official checkpoints load and compute exactly what the official code computes. Any single quirk
can be set against its mode's default: `model.quirks.<name>=true|false`, `data.augment.quirks.<name>`. Model quirks
(`ModelQuirks`) and data-augmentation quirks (`AugmentQuirks`) live here side by side; modules and
transforms receive the single flags they need, and nothing else in the code asks which mode is active.
(The official loader's int truncation of boxes is the reader setting `reader.int_boxes`.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal, Self

from src.errors import ConfigError

Mode = Literal["clean", "official"]
MODES: tuple[str, ...] = ("clean", "official")


class QuirkSwitches:
    """Base of the quirk sets: boolean dataclass fields, all off in clean mode, all on in official."""

    @classmethod
    def for_mode(cls, mode: str) -> Self:
        """All quirks off for `clean`, all on for `official`."""
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        on = mode == "official"
        return cls(**{f.name: on for f in fields(cls)})

    @classmethod
    def resolve(cls, mode: str, overrides: Mapping[str, bool | None] | None = None) -> Self:
        """The mode's defaults with single quirks set (`model.quirks.<name>`, `data.augment.quirks.<name>`);
        a None value keeps the mode's default."""
        names = [f.name for f in fields(cls)]
        chosen = {}
        for name, value in (overrides or {}).items():
            if name not in names:
                raise ConfigError(f"unknown {cls.__name__} switch {name!r}; known: {names}")
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"quirk {name} must be true, false or null, got {value!r}")
            if value is not None:
                chosen[name] = value
        return replace(cls.for_mode(mode), **chosen)

    def as_dict(self) -> dict[str, bool]:
        """Every switch and its effective value (what params JSON and results.json report)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ModelQuirks(QuirkSwitches):
    """Switches for the official model's numerically relevant quirks (mapper-spec §6)."""

    # §6.1b: the CLIP prior is fed BERT WordPiece ids instead of CLIP BPE ids, with no padding mask.
    prior_from_bert_ids: bool = False
    # §6.2: the fusion key-padding mask is a float tensor, adding +1 to padded keys' logits.
    additive_fusion_mask: bool = False
    # §6.3: DINOv2 runs without its register tokens (the reg4 weights lose their registers).
    drop_vision_registers: bool = False
    # §6.10: LoCA copies z's CLS row into its conv output and then adds z again (2·z_cls).
    loca_doubled_prefix: bool = False
    # §6.6: BERT has no token-type embedding (the pretrained segment-0 row is never added).
    bert_without_token_type: bool = False
    # §1.5: DyPA's output is added after the FFN block's residual + LayerNorm, not before it.
    dypa_after_ffn_norm: bool = False
    # §6.5: DyPA keeps its dead CLIP down-projection and gets HF's N(0, 0.02) init (up-proj not zero).
    dypa_official_init: bool = False
    # §1.9: LoCA's linear layers get trunc_normal(0.02) init (not zero), as timm's init re-runs.
    loca_official_init: bool = False
    # §1.2: a patch is padding iff its top-left pixel is (nearest resize), not iff all its pixels are.
    nearest_patch_mask: bool = False
    # §6.6: frozen BERT keeps its dropout active in training.
    frozen_text_dropout: bool = False
    # §1.8: the fusion's learned position table starts N(0, 1) (nn.Embedding's default). Added to
    # queries and keys, such large positions drown the content in the attention logits, and
    # content-based matching (phrase -> object) learns far slower than from an N(0, 0.02) start.
    unit_normal_fusion_positions: bool = False
    # §6.1: the official loader never loads CLIP's 12 text blocks: with pretrained weights they stay at
    # CLIP's random initialisation (here: CLIP's init scheme from a fixed seed); embeddings, final
    # LayerNorm and projection are loaded.
    prior_random_blocks: bool = False
    # §1.6: on GPU the official CLIP runs in fp16 (its convert_weights); here: fp16 autocast around the
    # prior on CUDA (LayerNorm stays fp32, as CLIP's own); no effect on CPU.
    prior_fp16: bool = False


@dataclass(frozen=True)
class AugmentQuirks(QuirkSwitches):
    """Switches for the TransVG/MaPPER augmentation quirks (mapper-spec §6.8); all on in official mode."""

    # The flip swaps the substrings "left"/"right" ("bright" -> "bleft", "upright" -> "upleft");
    # off: only the whole words left/right/leftmost/rightmost are swapped.
    substring_flip_swap: bool = False
    # The "phrase names a direction, so never crop" test matches substrings ("bright", "stopped");
    # off: whole words left/right/top/bottom/middle, optionally with "-most".
    substring_direction_test: bool = False
    # The crop is accepted when the box centre x exceeds the crop's top row and the centre y its left
    # column (i/j swapped), with no right/bottom check; off: the box centre must lie inside the crop.
    swapped_crop_check: bool = False
