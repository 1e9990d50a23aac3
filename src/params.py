"""Parameter report, counted the way the MaPPER paper counts its 1.41 %.

tunable_backbone: parameters of the PEFT modules inside or beside the backbones (MaPPER: DyPA, LoCA and
PGT; LoRA/adapter weights for the baselines; the whole backbones for full fine-tuning).
backbone_total: the standard released architectures at the configured sizes, BERT with its pooler and
token-type table plus DINOv2 without registers but with its mask token; the CLIP prior is excluded
(src/models/reference.py, which counts any other backbone pair the same way).

Run as `python -m src.params [hydra overrides]` to print the report as JSON (built on the meta
device: no weights are allocated or downloaded).
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from src.models.reference import count


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
