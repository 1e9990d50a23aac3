"""Parameter report, counted the way the MaPPER paper counts its 1.41 %.

tunable_backbone: parameters of the PEFT modules inside or beside the backbones (MaPPER: DyPA, LoCA and
PGT; LoRA/adapter weights for the baselines; the whole backbones for full fine-tuning).
backbone_total: the standard released architectures at the configured sizes, BERT with its pooler and
token-type table plus DINOv2 without registers but with its mask token; the CLIP prior is excluded.

Run as `python -m src.params [hydra overrides]` to print the report as JSON (built on the meta
device: no weights are allocated or downloaded).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import timm
import torch
from torch import nn
from transformers import BertModel

from src.models.encoders import TextSettings, VisionSettings, bert_config


@dataclass(frozen=True)
class BackboneReference:
    """The backbone architectures a grounder was built from, for counting the paper's denominator."""

    vision: VisionSettings
    text: TextSettings
    image_size: int

    def size(self) -> int:
        """Parameters of standard BERT (with pooler) + DINOv2 (no registers, with mask token)."""
        with torch.device("meta"):
            bert = BertModel(bert_config(self.text), add_pooling_layer=True)
            vit = timm.create_model(
                self.vision.arch, pretrained=False, img_size=self.image_size, num_classes=0,
                **{**self.vision.overrides(), "reg_tokens": 0, "no_embed_class": False},
            )
        # DINOv2's released model carries a mask token (used in its pretraining) that timm omits.
        return count(bert) + count(vit) + vit.embed_dim


def count(module: nn.Module, trainable: bool | None = None) -> int:
    """Number of parameters, optionally only the trainable (True) or frozen (False) ones."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def parameter_report(model: nn.Module) -> dict[str, float | int | str]:
    """Trainable / frozen / tunable-backbone counts, the tunable share of the backbones in %, and
    `summary`, the paper's figure as one line (e.g. `2,774,043 / 196,062,720 = 1.41%`)."""
    tunable = set(model.tunable_backbone_names)
    tunable_backbone = sum(p.numel() for n, p in model.named_parameters() if n in tunable)
    backbone_total = model.reference.size()
    pct = 100 * tunable_backbone / backbone_total
    return {
        "trainable": count(model, True),
        "frozen": count(model, False),
        "tunable_backbone": tunable_backbone,
        "backbone_total": backbone_total,
        "tunable_backbone_pct": round(pct, 4),
        "summary": f"{tunable_backbone:,} / {backbone_total:,} = {pct:.2f}%",
    }


def format_report(report: dict[str, float | int | str]) -> str:
    """One human line for the run log: trainable, frozen and the tunable-backbone share."""
    return (
        f"parameters: trainable {report['trainable']:,} | frozen {report['frozen']:,} | "
        f"tunable backbone {report['summary']}"
    )


def main(argv: list[str]) -> None:
    """Compose the run config with `argv` overrides, build the model on the meta device, print JSON
    (the parameter report and the effective model quirks)."""
    from hydra.utils import instantiate

    from src.config import compose

    cfg = compose(argv + ["model.pretrained=false"])
    with torch.device("meta"):
        model = instantiate(cfg.model, _partial_=True)(peft=instantiate(cfg.peft))
    print(json.dumps({**parameter_report(model), "quirks": model.quirks.as_dict()}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
