"""Other backbones: every known family resolves its roles, adapters keep their placements in layers shaped
unlike BERT's, unknown families are named, and two other pairs (a plain ViT + RoBERTa, a CLIP image tower
+ DistilBERT) train one step with mapper, lora and adapter from their conf/model file alone."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from torch import nn

from src.config import compose
from src.errors import ConfigError
from src.models.encoders import TextEncoder, TextSettings, VisionSettings, build_text
from src.models.grounder import build_grounder
from src.models.peft.base import Frozen
from src.models.peft.bottleneck import Adapter, Bottleneck
from src.models.peft.injection import AdaptedNorm, MlpInputTap, place_text_adapter
from src.models.peft.library import LibraryPeft
from src.models.peft.mapper import Mapper
from src.models.reference import BackboneReference
from src.models.roles import TEXT_FAMILIES
from src.run import build_module, build_trainer
from tests.conftest import TINY_MODEL
from tests.test_experiments import TINY_DATA
from tests.test_model import inputs

SMALL_MAPPER = dict(rank=4, loca_hidden=12, loca_branch1=8, loca_branch2_mid=4, loca_branch2_out=4)
TINY_VISION = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)
LINEAR_ROLES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "mlp_in", "mlp_out")


def tiny_text(arch: str) -> TextSettings:
    """TINY_MODEL's text sizes in `arch`'s own config fields (DistilBERT names its FFN width hidden_dim)."""
    ffn = {"hidden_dim": 64} if arch == "distilbert" else {"intermediate_size": 64}
    return TextSettings(arch=arch, config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                               vocab_size=200, **ffn))


def tiny(peft, vision_arch: str = "vit_small_patch16_224", text_arch: str = "bert", **overrides):
    """The tiny test grounder with other backbones, weights from seed 0 whatever the method."""
    torch.manual_seed(0)
    settings = {**TINY_MODEL, "vision": dict(arch=vision_arch, **TINY_VISION),
                "text": vars(tiny_text(text_arch)), **overrides}
    return build_grounder(peft, **settings)


@pytest.mark.parametrize("arch", sorted(TEXT_FAMILIES))
def test_every_text_family_resolves_its_roles_and_adapts_as_a_no_op(arch: str):
    encoder = TextEncoder(build_text(tiny_text(arch), pretrained=False, token_type=True)).eval()
    layer = encoder.layers[0]
    for role in LINEAR_ROLES:
        paths = encoder.roles.resolve([role], layer, "test")
        assert paths and all(isinstance(layer.get_submodule(p), nn.Linear) for p in paths), role
    assert encoder.roles.has("ffn_output") != (encoder.roles.has("mlp") and encoder.roles.has("mlp_norm"))
    x = inputs()
    plain = encoder(x["text_ids"], x["text_mask"])
    assert plain.shape == (2, TINY_MODEL["max_query_len"], 32)
    for placement in ("parallel", "parallel_after_norm", "serial"):
        adapted = copy.deepcopy(encoder)
        for adapted_layer in adapted.layers:
            place_text_adapter(adapted, adapted_layer, Bottleneck(32, 4, "relu", 1.0), placement)
        assert torch.equal(adapted(x["text_ids"], x["text_mask"]), plain), placement  # zero-initialised up


@pytest.mark.parametrize("placement", ["parallel", "parallel_after_norm", "serial"])
def test_distilbert_placements_match_the_bert_formulas(placement: str):
    """DistilBERT's layer (ffn, then output_layer_norm over ffn + x) takes each placement to the same effect
    as BERT's FFN output block: LN(f + x + a(x)), LN(f + x) + a(x), LN(f + x + a(f))."""
    encoder = TextEncoder(build_text(tiny_text("distilbert"), pretrained=False, token_type=True)).eval()
    torch.manual_seed(1)
    adapter = nn.Linear(32, 32)  # non-zero, so that where it reads and adds shows
    plain = copy.deepcopy(encoder.layers[0])
    seen: dict[str, torch.Tensor] = {}
    plain.ffn.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], f=out))
    hidden = torch.randn(2, 5, 32)
    plain(hidden)
    x, f, norm = seen["x"], seen["f"], plain.output_layer_norm
    expected = {"parallel": norm(f + adapter(x) + x), "parallel_after_norm": norm(f + x) + adapter(x),
                "serial": norm(f + adapter(f) + x)}[placement]
    layer = encoder.layers[0]
    place_text_adapter(encoder, layer, adapter, placement)
    torch.testing.assert_close(layer(hidden), expected, rtol=0, atol=1e-6)
    if placement == "parallel_after_norm":
        assert isinstance(layer.ffn, MlpInputTap) and isinstance(layer.output_layer_norm, AdaptedNorm)
        assert "output_layer_norm.adapter.weight" in layer.state_dict()


@pytest.mark.parametrize("arch", ["vit_small_patch16_224", "vit_base_patch16_clip_224",
                                  "deit_tiny_distilled_patch16_224"])
def test_timm_vits_take_mapper_lora_and_adapters(arch: str):
    """Plain, CLIP-tower and distilled (two prefix tokens) ViTs: each method starts as an exact no-op."""
    x = inputs()
    plain = tiny(Frozen(), arch).eval()
    for method in (Mapper(**SMALL_MAPPER), LibraryPeft(), Adapter(rank=4)):
        model = tiny(method, arch).eval()
        assert any(n.startswith("vision.") for n in model.tunable_backbone_names), type(method).__name__
        assert torch.equal(model.vision(x["image"]), plain.vision(x["image"]))
        assert model(**x).boxes.shape == (2, 4)


def test_unknown_backbones_are_config_errors_naming_the_model():
    with pytest.raises(ConfigError, match="model.text.arch='gpt2'"):
        tiny(Frozen(), text=dict(arch="gpt2"))
    with pytest.raises(ConfigError, match=r"model.text.config.intermediate_size is not a setting of DistilBert"):
        tiny(Frozen(), text=dict(arch="distilbert", config=dict(intermediate_size=64)))
    for arch, why in (("eva02_tiny_patch14_224", "not a VisionTransformer"),
                      ("vit_small_patch16_18x2_224", "ParallelThingsBlock blocks"),
                      ("vit_base_patch16_siglip_224", "no class token")):
        with pytest.raises(ConfigError, match=rf"model.vision.arch='{arch}'.*{why}"):
            tiny(Frozen(), arch)


def test_peft_targets_are_roles_or_the_module_paths_older_configs_name():
    roles = tiny(LibraryPeft(), text_arch="bert").tunable_backbone_names
    paths = tiny(LibraryPeft(vision_targets=["attn.qkv", "attn.proj"], text_targets=[
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]),
        text_arch="bert").tunable_backbone_names
    assert roles == paths and len(roles) == 2 * 2 * 6
    fused = tiny(LibraryPeft(vision_targets=["attn_q", "attn_k", "attn_v"], text_targets=[])).tunable_backbone_names
    assert {re.sub(r"blocks\.\d+\.", "", n) for n in fused} == {f"vision.vit.attn.qkv.lora_{m}.default.weight"
                                                                 for m in "AB"}  # one fused qkv, once
    with pytest.raises(ConfigError, match=r"peft.text_targets: 'ffn_output' is neither a role of distilbert"):
        tiny(LibraryPeft(text_targets=["ffn_output"]), text_arch="distilbert")
    with pytest.raises(ConfigError, match=r"peft.vision_targets: 'attn.q' is neither a role of timm Block"):
        tiny(LibraryPeft(vision_targets=["attn.q"]))


def test_pretrained_text_weights_of_another_family_are_refused(tmp_path: Path):
    """Local weights of the configured family load; another family's would be left random: refused."""
    settings = {arch: tiny_text(arch) for arch in ("distilbert", "bert")}
    for arch, text in settings.items():
        build_text(text, pretrained=False, token_type=True).save_pretrained(tmp_path / arch)
    loaded = build_text(TextSettings(**{**vars(settings["distilbert"]), "weights": str(tmp_path / "distilbert")}),
                        pretrained=True, token_type=True)
    assert loaded.config.model_type == "distilbert"
    wrong = TextSettings(**{**vars(settings["distilbert"]), "weights": str(tmp_path / "bert")})
    with pytest.raises(ConfigError, match=r"model.text.weights=.* lacks \d+ weights of the configured distilbert"):
        build_text(wrong, pretrained=True, token_type=True)


def test_reference_counts_other_released_architectures():
    """The denominator for ViT-S/16 (no mask token: not DINOv2) + roberta-base (released without pooler)."""
    roberta_base = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)
    reference = BackboneReference(VisionSettings(arch="vit_small_patch16_224"),
                                  TextSettings(arch="roberta", config=roberta_base), 224)
    assert reference.size() == 21_665_664 + 124_055_040


PAIRS = {  # conf/model file -> where each method's text modules sit in its text family
    "vit_roberta_tiny": {"adapter": r"encoder\.layer\.1\.output\.adapter\.",
                         "mapper": r"encoder\.layer\.1\.output\.adapter\.",
                         "lora": r"encoder\.layer\.1\.attention\.(self\.(query|key|value)|output\.dense)\.lora_"},
    "clip_distilbert_tiny": {"adapter": r"transformer\.layer\.1\.ffn\.adapter\.",
                             "mapper": r"transformer\.layer\.1\.ffn\.adapter\.",
                             "lora": r"transformer\.layer\.1\.attention\.(q|k|v|out)_lin\.lora_"},
}
VISION_PARTS = {"adapter": r"blocks\.1\.mlp\.adapter\.", "mapper": r"blocks\.1\.mlp\.adapter\.",
                "lora": r"blocks\.1\.attn\.(qkv|proj)\.lora_"}


def train_one_step(overrides: list[str], method: str, text_parts: str, tmp_path: Path) -> None:
    """Build `method` on the model `overrides` name, check its modules sit where the roles put them (the vision
    parts of VISION_PARTS, the text parts matching `text_parts`), train one step: only trainable tensors change,
    and a PEFT module inside the backbones among them."""
    small = [f"peft.{k}={v}" for k, v in SMALL_MAPPER.items()] if method == "mapper" else []
    cfg = compose([
        *overrides, f"peft={method}", *small, "trainer=default", "logger=none", "vision_pretraining=null",
        "text_pretraining=null", f"paths.cache_dir={tmp_path}", f"paths.output_dir={tmp_path}", *TINY_DATA,
        "+trainer.fast_dev_run=1", "trainer.accelerator=cpu",
    ])
    with open_dict(cfg):
        cfg.callbacks = {}
    module = build_module(cfg)
    tunable = module.model.tunable_backbone_names
    allowed = rf"vision\.vit\.{VISION_PARTS[method]}.+|text\.bert\.{text_parts}.+|text_merge\..+"
    assert tunable and all(re.fullmatch(allowed, n) for n in tunable), tunable
    assert any(n.startswith("vision.") for n in tunable) and any(n.startswith("text.") for n in tunable)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert trainer.global_step == 1
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert changed & set(tunable), "no PEFT module inside the backbones trained"


@pytest.mark.parametrize("method", ["mapper", "lora", "adapter"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_other_backbone_pairs_train_one_step_from_conf_model_alone(pair: str, method: str, tmp_path: Path):
    train_one_step([f"model={pair}"], method, PAIRS[pair][method], tmp_path)
