"""The grounder's shapes, masks, PEFT injection, freezing and the clean/official switches."""

from __future__ import annotations

import copy

import pytest
import torch

from src.models.grounder import build_grounder
from src.models.peft.base import Frozen, Full
from src.models.peft.injection import AdaptedMlp
from src.models.peft.mapper import LoCA, Mapper
from tests.conftest import TINY_MODEL

B, L, S = 2, TINY_MODEL["max_query_len"], TINY_MODEL["image_size"]


def tiny(mode: str = "clean", peft=None, **overrides):
    torch.manual_seed(0)
    return build_grounder(peft or Mapper(rank=4, loca_hidden=12, loca_branch1=8, loca_branch2_mid=4,
                                          loca_branch2_out=4), mode=mode, **{**TINY_MODEL, **overrides})


def inputs(pad_text_from: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text_mask = torch.zeros(B, L, dtype=torch.long)
    text_mask[:, :pad_text_from] = 1
    text_ids = torch.randint(1, 200, (B, L), generator=g) * text_mask
    return dict(
        image=torch.randn(B, 3, S, S, generator=g),
        pixel_mask=torch.zeros(B, S, S, dtype=torch.bool),
        text_ids=text_ids, text_mask=text_mask,
        prior_ids=torch.randint(1, 300, (B, L), generator=g) * text_mask, prior_mask=text_mask.clone(),
    )


def test_forward_shapes_and_box_range():
    model = tiny().eval()
    out = model(**inputs(), return_features=True)
    grid = S // 8
    assert out.boxes.shape == (B, 4) and (out.boxes > 0).all() and (out.boxes < 1).all()
    f = out.features
    assert f["visual"].shape == (B, 1 + grid * grid, 32)  # class token + patches, registers dropped
    assert f["bert"].shape == (B, L, 32) and f["pgt"].shape == (B, L, 32)
    assert f["clip_prior"].shape == (B, L, 16) and f["vl_reg"].shape == (B, 32)
    assert model.pos_embed.num_embeddings == 1 + L + 1 + grid * grid


def test_official_mode_drops_registers_and_keeps_geometry():
    model = tiny("official")
    assert model.vision.num_prefix_tokens == 1 and model.vision.vit.reg_token is None
    assert tiny("clean").vision.num_prefix_tokens == 5


def test_clean_adapters_start_as_exact_no_ops():
    model = tiny().eval()
    plain = copy.deepcopy(model)
    for block in plain.vision.layers:
        if isinstance(block.mlp, AdaptedMlp):
            block.mlp = block.mlp.mlp
    for layer in plain.text.layers:
        if hasattr(layer.output, "adapter"):
            layer.output = layer.output.output
    x = inputs()
    a, b = model(**x, return_features=True).features, plain.text(x["text_ids"], x["text_mask"])
    assert torch.equal(a["visual"], plain.vision(x["image"]))
    assert torch.allclose(a["bert"], b, atol=1e-6)
    official = tiny("official").eval()
    assert official.vision.layers[1].mlp.adapter.fc2.weight.abs().sum() > 0  # official LoCA is not zero-init


def test_patch_padding_clean_needs_whole_patch_official_uses_top_left_pixel():
    mask = torch.zeros(1, S, S, dtype=torch.bool)
    mask[:, :, :12] = True  # 12 left columns padded: patch column 0 wholly, column 1 only its first 4 pixels
    clean = tiny().patch_padding(mask).view(-1)
    official = tiny("official").patch_padding(mask).view(-1)
    grid = S // 8
    assert not clean[0] and not official[0]  # the class token is never padding
    clean_cols = clean[1:].view(grid, grid)[0]
    official_cols = official[1:].view(grid, grid)[0]
    assert clean_cols.tolist() == [True, False, False, False]
    assert official_cols.tolist() == [True, True, False, False]


def test_padded_text_is_ignored_in_clean_but_not_in_official_mode():
    x = inputs()
    changed = dict(x, text_ids=x["text_ids"].clone())
    changed["text_ids"][:, 6] = 77  # a padded position (mask 0)
    clean = tiny().eval()
    assert torch.allclose(clean(**x).boxes, clean(**changed).boxes, atol=1e-6)
    official = tiny("official").eval()
    assert not torch.allclose(official(**x).boxes, official(**changed).boxes, atol=1e-6)


def test_official_prior_reads_bert_ids_clean_prior_reads_clip_ids():
    x = inputs()
    other_prior = dict(x, prior_ids=(x["prior_ids"] + 1) * x["prior_mask"])
    official = tiny("official").eval()
    assert torch.equal(official(**x).boxes, official(**other_prior).boxes)
    clean = tiny().eval()
    assert not torch.allclose(clean(**x).boxes, clean(**other_prior).boxes)


def test_mapper_freezes_backbones_and_trains_only_its_modules():
    model = tiny()
    tunable = set(model.tunable_backbone_names)
    for name, p in model.named_parameters():
        if name.startswith(("vision.", "text.")):
            assert p.requires_grad == (name in tunable), name
        if name.startswith("prior."):
            assert not p.requires_grad
    assert any(".adapter." in n for n in tunable) and any(n.startswith("text_merge.") for n in tunable)
    groups = model.optimizer_groups()
    assert groups["vision"] and groups["text"] and groups["head"]


def test_frozen_and_full_methods_need_no_prior():
    frozen, full = tiny(peft=Frozen()), tiny(peft=Full())
    assert frozen.prior is None and full.prior is None
    assert not frozen.optimizer_groups()["vision"] and not frozen.tunable_backbone_names
    assert all(p.requires_grad for p in full.vision.parameters())
    assert full(**inputs()).boxes.shape == (B, 4)


def test_clean_mode_silences_frozen_backbone_dropout_official_keeps_bert_dropout():
    def text_dropout_training(model):
        modules = model.named_modules()
        return {m.training for n, m in modules if n.startswith("text.") and isinstance(m, torch.nn.Dropout)}

    assert text_dropout_training(tiny().train()) == {False}
    assert text_dropout_training(tiny("official").train()) == {True}
    assert text_dropout_training(tiny(peft=Full()).train()) == {True}


def test_loca_official_doubles_the_class_row():
    torch.manual_seed(0)
    official = LoCA(8, 6, 4, 2, 2, (2, 2), 1, doubled_prefix=True, official_init=True).eval()
    clean = copy.deepcopy(official)
    clean.doubled_prefix = False
    u = torch.randn(1, 5, 8)
    z_cls = torch.relu(official.fc1(u))[:, :1]
    assert torch.allclose(official(u)[:, 0], official.fc2(2 * z_cls)[:, 0], atol=1e-6)
    assert torch.allclose(clean(u)[:, 0], clean.fc2(z_cls)[:, 0], atol=1e-6)
    assert torch.equal(official(u)[:, 1:], clean(u)[:, 1:])


def test_adapter_layers_out_of_range_are_reported():
    with pytest.raises(ValueError, match="layers \\[7\\]"):
        tiny(peft=Mapper(vision_layers=[1, 7], rank=4, loca_hidden=12, loca_branch1=8, loca_branch2_mid=4,
                         loca_branch2_out=4))


def test_wrong_query_length_is_rejected():
    x = inputs()
    x["text_ids"], x["text_mask"] = x["text_ids"][:, :4], x["text_mask"][:, :4]
    with pytest.raises(ValueError, match="max_query_len"):
        tiny()(**x)


def test_fusion_positions_start_small_in_clean_mode_and_unit_normal_in_official_mode():
    assert tiny().pos_embed.weight.std().item() < 0.05
    assert 0.8 < tiny("official").pos_embed.weight.std().item() < 1.2


def test_sincos_positions_for_random_vits():
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    vision = {**TINY_MODEL["vision"], "random_pos_embed": "sincos"}
    vit = tiny(vision=vision).vision.vit
    table = build_sincos2d_pos_embed(list(vit.patch_embed.grid_size), vit.embed_dim)
    assert torch.equal(vit.pos_embed[0, -table.shape[0]:], table)
    assert tiny().vision.vit.pos_embed.abs().max() < 0.2  # timm's own random init is tiny
    with pytest.raises(ValueError, match="random_pos_embed"):
        tiny(vision={**TINY_MODEL["vision"], "random_pos_embed": "learned"})


def test_single_quirks_are_config_switches_against_the_mode():
    from src.config import compose
    from src.run import build_seeded_module

    def grounder(*overrides: str):
        cfg = compose(["peft=lora", "vision_pretraining=null", "text_pretraining=null", "paths.output_dir=x",
                       *overrides])
        return build_seeded_module(cfg).model

    clean, one = grounder(), grounder("model.quirks.additive_fusion_mask=true")
    assert [k for k, v in one.quirks.as_dict().items() if v] == ["additive_fusion_mask"]
    batch = {"image": torch.randn(2, 3, 96, 96), "pixel_mask": torch.zeros(2, 96, 96, dtype=torch.bool),
             "text_ids": torch.tensor([[101, 2417, 102] + [0] * 13] * 2),
             "text_mask": torch.tensor([[1, 1, 1] + [0] * 13] * 2)}
    clean.eval(), one.eval()
    with torch.no_grad():  # same weights, one mask convention changed: padded keys get +1 in their logits
        assert not torch.allclose(clean(**batch).boxes, one(**batch).boxes)
    official = grounder("model.mode=official", "model.quirks.prior_from_bert_ids=false")
    assert [k for k, v in official.quirks.as_dict().items() if not v] == ["prior_from_bert_ids"]
    with pytest.raises(ValueError, match="unknown ModelQuirks switch 'no_such_quirk'"):
        grounder("+model.quirks.no_such_quirk=true")


def test_single_augmentation_quirks_reach_the_train_transform():
    from hydra.utils import instantiate

    from src.config import compose
    from src.data.transforms import TrainTransform, build_transform

    dm = instantiate(compose(["data.augment.enabled=true", "data.augment.quirks.swapped_crop_check=true"]).data)
    transform = build_transform(True, dm.image_size, dm.augment, dm.mode, dm.augment_quirks)
    assert isinstance(transform, TrainTransform)
    assert [k for k, v in transform.quirks.as_dict().items() if v] == ["swapped_crop_check"]
    with pytest.raises(Exception, match="unknown AugmentQuirks switch"):  # wrapped by Hydra
        instantiate(compose(["+data.augment.quirks.flip_everything=true"]).data)


def test_prior_random_blocks_keeps_the_loaded_embeddings_and_projection_only(tmp_path):
    from src.models.encoders import PriorSettings, build_clip_text, clip_config

    small = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                 projection_dim=16, vocab_size=300)
    settings = PriorSettings(weights=str(tmp_path / "clip"), config=small)
    torch.manual_seed(5)
    from transformers import CLIPTextModelWithProjection

    CLIPTextModelWithProjection(clip_config(settings)).save_pretrained(tmp_path / "clip")  # "pretrained" weights
    saved = build_clip_text(settings, pretrained=True).state_dict()
    official = build_clip_text(settings, pretrained=True, random_blocks=True).state_dict()
    again = build_clip_text(settings, pretrained=True, random_blocks=True).state_dict()
    blocks = [k for k in saved if ".encoder.layers." in k]
    kept = [k for k in saved if k not in blocks]
    assert blocks and kept and all(torch.equal(saved[k], official[k]) for k in kept)
    weights = [k for k in blocks if k.endswith("proj.weight") or k.endswith("fc1.weight") or k.endswith("fc2.weight")]
    assert all(not torch.equal(saved[k], official[k]) for k in weights)  # re-drawn ...
    assert all(torch.equal(official[k], again[k]) for k in blocks)  # ... from a fixed seed
    assert ModelQuirksFor("official").prior_random_blocks and not ModelQuirksFor("clean").prior_random_blocks


def ModelQuirksFor(mode: str):  # noqa: N802 (reads as the class it stands for)
    from src.quirks import ModelQuirks

    return ModelQuirks.for_mode(mode)


def test_prior_fp16_changes_nothing_on_cpu():
    from src.models.encoders import PriorSettings, TextPrior, build_clip_text

    settings = PriorSettings(config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=48, projection_dim=16, vocab_size=300))
    torch.manual_seed(0)
    clip = build_clip_text(settings, pretrained=False)
    ids, mask = torch.randint(1, 300, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():  # fp16 autocast applies on CUDA only (the official GPU run); CPU stays fp32
        assert torch.equal(TextPrior(clip, fp16=True)(ids, mask), TextPrior(clip)(ids, mask))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_fused_fusion_attention_equals_multihead_attention(mask_dtype):
    from src.models.fusion import FusionLayer

    torch.manual_seed(0)
    layer = FusionLayer(64, 8, 128, dropout=0.0)
    x, pos = torch.randn(3, 20, 64), torch.randn(1, 20, 64)
    mask = torch.rand(3, 20) > 0.6
    mask[:, 0] = False
    mask = mask.to(mask_dtype)  # float: the official +1 on padded keys' logits
    for mode in (True, False):
        layer.train(mode)
        reference = layer.self_attn(x + pos, x + pos, x, key_padding_mask=mask, need_weights=False)[0]
        assert torch.allclose(layer.attend(x + pos, x, mask), reference, atol=1e-6)


CHECKPOINTING_CASES = [
    ("mapper", "true", []), ("lora", "true", []), ("mapper", "all", []), ("mapper", "all", ["model.mode=official"]),
]


@pytest.mark.parametrize(("peft", "checkpointing", "extra"), CHECKPOINTING_CASES)
def test_checkpointing_gives_the_same_step(peft, checkpointing, extra):
    from tests.test_checkpoints import module_for

    def step(checkpointing: str):
        overrides = ["peft.rank=4"] if peft == "mapper" else []
        module = module_for(peft, *overrides, *extra, f"model.checkpointing={checkpointing}")
        for layer in module.model.fusion.layers:  # dropout masks must repeat in the recompute
            layer.self_attn.dropout = 0.2
            layer.dropout.p = layer.dropout1.p = layer.dropout2.p = 0.2
        module.model.train()
        calls = {2: [], 3: []}
        for index, seen in calls.items():
            module.model.vision.layers[index].attn.register_forward_hook(lambda *_, seen=seen: seen.append(1))
        torch.manual_seed(5)
        loss = module.loss(module(inputs()).boxes, torch.tensor([[0.5, 0.5, 0.2, 0.3]] * B))["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        buffers = {n: b.clone() for n, b in module.model.named_buffers()}
        return module.model.checkpointed_blocks, loss.detach(), grads, buffers, {i: len(c) for i, c in calls.items()}

    plain_blocks, plain_loss, plain_grads, plain_buffers, plain_calls = step("false")
    blocks, loss, grads, buffers, calls = step(checkpointing)
    # TINY_MODEL adapts blocks 1 and 3 of each backbone: block 2 is frozen and gradients pass through it
    assert plain_blocks == [] and plain_calls == {2: 1, 3: 1}
    if checkpointing == "all":  # every block, the adapted ones (LoCA with BatchNorm, DyPA) and the fusion too
        assert calls == {2: 2, 3: 2} and {"vision.3", "text.1", "text.3", "fusion.0", "fusion.1"} <= set(blocks)
    else:
        assert calls == {2: 2, 3: 1} and {"vision.2", "text.2"} <= set(blocks)
        assert not {"vision.1", "vision.3", "text.1", "text.3", "fusion.0"} & set(blocks)
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    assert all(torch.allclose(grads[n], plain_grads[n], atol=1e-6, rtol=1e-5) for n in grads)
    assert all(torch.equal(buffers[n], plain_buffers[n]) for n in buffers)  # BatchNorm stats updated once


def test_checkpointing_refuses_unknown_modes():
    from src.models.checkpointing import checkpointing_mode

    values = (False, None, True, "frozen", "all")
    assert [checkpointing_mode(v) for v in values] == [None, None, "frozen", "frozen", "all"]
    with pytest.raises(ValueError, match="frozen"):
        checkpointing_mode("everything")
