"""`model.pretrained=true` loads real weights from local files/folders (what the hub path does too)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from transformers import BertModel, CLIPTextModelWithProjection

from src.models.encoders import PriorSettings, TextSettings, clip_config, text_config
from src.models.grounder import build_grounder
from src.models.peft.mapper import Mapper
from tests.conftest import TINY_MODEL

MAPPER = dict(rank=4, loca_hidden=12, loca_branch1=8, loca_branch2_mid=4, loca_branch2_out=4)


def save_backbones(tmp_path: Path) -> dict[str, object]:
    """Random tiny backbones saved the way their libraries save released weights."""
    torch.manual_seed(123)
    vision = TINY_MODEL["vision"]
    vit = timm.create_model(vision["arch"], pretrained=False, img_size=TINY_MODEL["image_size"], num_classes=0,
                            **{k: v for k, v in vision.items() if k != "arch"})
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    bert = BertModel(text_config(TextSettings(**TINY_MODEL["text"])), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    clip = CLIPTextModelWithProjection(clip_config(PriorSettings(**TINY_MODEL["prior"])))
    clip.save_pretrained(tmp_path / "clip")
    return {"vit": vit, "bert": bert, "clip": clip}


def tiny_pretrained(tmp_path: Path, mode: str):
    settings = {
        **TINY_MODEL,
        "vision": {**TINY_MODEL["vision"], "weights": str(tmp_path / "vit.pth")},
        "text": {**TINY_MODEL["text"], "weights": str(tmp_path / "bert")},
        "prior": {**TINY_MODEL["prior"], "weights": str(tmp_path / "clip")},
    }
    torch.manual_seed(0)
    return build_grounder(Mapper(**MAPPER), mode=mode, pretrained=True, **settings)


def test_clean_mode_loads_every_backbone_from_local_weights(tmp_path: Path):
    saved = save_backbones(tmp_path)
    model = tiny_pretrained(tmp_path, "clean")
    assert torch.equal(model.vision.vit.patch_embed.proj.weight, saved["vit"].patch_embed.proj.weight)
    assert torch.equal(model.vision.vit.reg_token, saved["vit"].reg_token)
    assert torch.equal(model.vision.vit.blocks[1].mlp.mlp.fc1.weight, saved["vit"].blocks[1].mlp.fc1.weight)
    assert torch.equal(model.text.bert.embeddings.word_embeddings.weight,
                       saved["bert"].embeddings.word_embeddings.weight)
    assert torch.equal(model.text.bert.embeddings.token_type_embeddings.weight,
                       saved["bert"].embeddings.token_type_embeddings.weight)
    assert torch.equal(model.prior.clip.text_projection.weight, saved["clip"].text_projection.weight)


def test_official_mode_drops_registers_but_keeps_class_position(tmp_path: Path):
    saved = save_backbones(tmp_path)
    model = tiny_pretrained(tmp_path, "official")
    vit, ref = model.vision.vit, saved["vit"]
    assert vit.reg_token is None and model.vision.num_prefix_tokens == 1
    # timm's register model keeps the class position folded into cls_token: the plain model gets a zero row
    assert torch.equal(vit.pos_embed[0, 0], torch.zeros_like(vit.pos_embed[0, 0]))
    assert torch.equal(vit.pos_embed[0, 1:], ref.pos_embed[0])
    assert torch.equal(vit.cls_token, ref.cls_token)
    # no token-type table in official mode: the pretrained one is dropped, as the official BERT does
    assert not any("token_type" in k for k in model.text.bert.state_dict())
