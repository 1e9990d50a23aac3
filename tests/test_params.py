"""`python -m src.params` reproduces the paper's parameter counts (mapper-spec §2.1, §3)."""

from __future__ import annotations

import json

import pytest

from src.params import main

# The official model has 385,005,344 parameters; the suite does not build the ones its forward never
# uses: CLIP's image tower + logit_scale (86,192,641), BERT's cross-attention (28,366,848) and DINOv2's
# mask token (768).
OFFICIAL_BUILT_MINUS_UNUSED = 385_005_344 - 86_192_641 - 28_366_848 - 768


def report(capsys: pytest.CaptureFixture[str], *overrides: str) -> dict[str, float]:
    """Run the params CLI in-process and parse its JSON."""
    main(list(overrides))
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def test_paper_configuration_official_mode_gives_1_41_percent(capsys: pytest.CaptureFixture[str]) -> None:
    r = report(capsys, "model=mapper_base", "model.mode=official")
    assert r["tunable_backbone"] == 2_774_043  # LoCA 1,581,912 + DyPA 208,323 + PGT 983,808
    assert r["backbone_total"] == 196_062_720  # BERT-base with pooler + DINOv2 ViT-B/14 with mask token
    assert r["tunable_backbone_pct"] == 1.4149 and round(r["tunable_backbone_pct"], 2) == 1.41
    assert r["summary"] == "2,774,043 / 196,062,720 = 1.41%"
    assert r["trainable"] == 11_547_167
    assert r["trainable"] + r["frozen"] == OFFICIAL_BUILT_MINUS_UNUSED
    assert r["quirks"] and all(r["quirks"].values())  # official mode: every model quirk on, reported


def test_refcocog_query_length_adds_only_position_rows(capsys: pytest.CaptureFixture[str]) -> None:
    r = report(capsys, "model=mapper_base", "model.mode=official", "model.max_query_len=40")
    assert r["trainable"] == 11_552_287 and r["tunable_backbone"] == 2_774_043


def test_clean_mode_drops_the_dead_dypa_projection(capsys: pytest.CaptureFixture[str]) -> None:
    r = report(capsys, "model=mapper_base")
    assert r["tunable_backbone"] == 2_724_795  # 3 x 16,416 fewer: no unused CLIP down-projection
    assert r["backbone_total"] == 196_062_720
    assert round(r["tunable_backbone_pct"], 2) == 1.39
