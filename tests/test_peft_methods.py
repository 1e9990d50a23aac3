"""Every PEFT method config: exactly what it declares trains, it starts as it declares, settings, rank sweeps.

The matrix is the suite's method configs (`src.methods.method_names`) and what each method declares
about itself (`trains`, `no_op_start`); a new method config is tested by being there.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hydra.utils import instantiate

from src.config import compose
from src.methods import method_names
from src.models.grounder import Grounder, build_grounder
from src.models.peft.base import PeftMethod
from src.models.peft.bottleneck import Adapter, AdaptFormer
from src.models.peft.library import LibraryPeft
from src.models.peft.mapper import DyPA, Mapper
from tests.conftest import TINY_MODEL, at_test_size
from tests.test_checkpoints import module_for
from tests.test_model import inputs

HEAD = ("visu_proj.", "text_proj.", "reg_token.", "pos_embed.", "fusion.", "head.")
VIT = r"vision\.vit\.blocks\.(1|3)\."
BERT = r"text\.bert\.encoder\.layer\.(1|3)\."
LORA_TARGETS = rf"({VIT}attn\.(qkv|proj)|{BERT}attention\.(self\.(query|key|value)|output\.dense))"
# Where each part a method may train lies in the tiny model, whose adapter layers are 1 and 3 of both backbones.
PART_TENSORS = {"vision_layers": VIT, "text_layers": BERT, "text_merge": r"text_merge\.",
                "vision_weights": r"vision\.", "text_weights": r"text\."}

# The suite's own methods, tensor by tensor: regex every trainable non-head tensor must match, how many there are.
TENSORS = {
    "lora": (rf"{LORA_TARGETS}\.lora_(A|B)\.default\.weight", 2 * 2 * 6),
    "dora": (rf"{LORA_TARGETS}\.(lora_(A|B)|lora_magnitude_vector)\.default\.weight", 2 * 3 * 6),
    "ia3": (rf"({VIT}(attn\.qkv|mlp\.fc2)|{BERT}(attention\.self\.(key|value)|output\.dense))\.ia3_l\.default",
            2 * 5),
    "loha": (rf"{LORA_TARGETS}\.hada_(w1|w2)_(a|b)\.default", 2 * 4 * 6),
    "lokr": (rf"{LORA_TARGETS}\.lokr_w(1|2|2_a|2_b)\.default", None),
    "adapter": (rf"({VIT}mlp|{BERT}output)\.adapter\.(down|up)\.(weight|bias)", 2 * 2 * 4),
    "adaptformer": (rf"({VIT}mlp|{BERT}output)\.adapter\.(down|up)\.(weight|bias)", 2 * 2 * 4),
    "mapper": (rf"({VIT}mlp\.adapter\.(fc1|fc2|branch1|branch2)\..*|{BERT}output\.adapter\.\w+\.(weight|bias)"
               r"|text_merge\.proj\.(weight|bias))", None),
    "full": (r"(vision|text)\..*", None),
    "frozen": (r"(?!)", 0),
}


def built(name: str, *overrides: str, mode: str = "clean") -> tuple[PeftMethod, Grounder]:
    """The method config `name` (at test size) and the tiny test grounder built with it."""
    cfg = at_test_size(compose([f"peft={name}", *overrides]), overrides)
    method = instantiate(cfg.peft)
    torch.manual_seed(0)
    return method, build_grounder(method, mode=mode, **TINY_MODEL)


def tiny_with(name: str, *overrides: str, mode: str = "clean") -> Grounder:
    """The tiny test grounder with the PEFT method composed from conf/peft/<name>.yaml."""
    return built(name, *overrides, mode=mode)[1]


def trained_parts(model: Grounder, plain: Grounder) -> dict[str, list[str]]:
    """The trainable non-head tensors of `model` by the part they lie in (`?` for none): a backbone's own
    weights are those the `plain` (frozen) grounder has too, every other tensor a method brought."""
    own = {n for n, _ in plain.named_parameters()}
    parts: dict[str, list[str]] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad or n.startswith(HEAD):
            continue
        candidates = ("vision_weights", "text_weights") if n in own else ("vision_layers", "text_layers", "text_merge")
        part = next((c for c in candidates if re.match(PART_TENSORS[c], n)), "?")
        parts.setdefault(part, []).append(n)
    return parts


@pytest.mark.parametrize("name", method_names())
def test_exactly_what_the_method_declares_trains(name: str):
    check_trains_what_it_declares(name, *built(name))


def check_trains_what_it_declares(name: str, method: PeftMethod, model: Grounder) -> None:
    """The whole head trains, and of the backbones exactly the parts `method` declares (`trains`)."""
    plain = tiny_with("frozen")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [n for n in trainable if n.startswith(HEAD)]
    assert {n.split(".")[0] for n in head} == {h.rstrip(".") for h in HEAD}  # the whole head trains
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(HEAD))
    parts = trained_parts(model, plain)
    assert "?" not in parts, f"{name} trains tensors outside every part it may train: {parts['?'][:5]}"
    assert set(parts) == set(method.trains), f"{name} declares {sorted(method.trains)}, trains {sorted(parts)}"
    tensors = [n for part in parts.values() for n in part]
    assert set(model.tunable_backbone_names) == set(tensors)
    if model.prior is not None:
        assert not any(p.requires_grad for p in model.prior.parameters())
    assert model.prior is not None or not method.uses_prior
    if not method.freezes_backbones:  # the backbones are fine-tuned: all their weights
        assert set(tensors) == {n for n, _ in plain.named_parameters() if n.startswith(("vision.", "text."))}


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_the_suites_methods_train_exactly_these_tensors(name: str):
    pattern, count = TENSORS[name]
    model = tiny_with(name)
    method = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEAD)]
    bad = [n for n in method if not re.fullmatch(pattern, n)]
    assert not bad, f"{name} trains tensors it should not: {bad[:5]}"
    if count is not None:
        assert len(method) == count, method


@pytest.mark.parametrize("name", method_names())
def test_method_starts_as_it_declares_on_the_frozen_backbones(name: str):
    method, model = built(name)
    if method.no_op_start == "no":
        pytest.skip(f"{name} does not start as a no-op")
    check_starts_as_declared(method, model)


def check_starts_as_declared(method: PeftMethod, model: Grounder) -> None:
    """Backbone outputs with the method injected equal the plain frozen backbones' where the method says it
    starts as an exact no-op, up to float rounding where it says so (DoRA)."""
    model.eval()
    plain = tiny_with("frozen").eval()
    plain.vision.load_state_dict(base_state(model.vision))
    plain.text.load_state_dict(base_state(model.text))
    x = inputs()
    prior = model._prior(x["text_ids"], x["text_mask"], x["prior_ids"], x["prior_mask"])
    for ours, theirs in ((model.vision(x["image"]), plain.vision(x["image"])),
                         (model.text(x["text_ids"], x["text_mask"], condition=prior),
                          plain.text(x["text_ids"], x["text_mask"]))):
        if method.no_op_start == "exact":
            assert torch.equal(ours, theirs)
        else:
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def base_state(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A backbone's frozen weights under their original names (peft's `base_layer.` and the adapter
    wrappers' `.mlp`/`.output` renamed back; the method's own tensors left out)."""
    out = {}
    for key, value in backbone.state_dict().items():
        if value.requires_grad or re.search(r"(lora_|ia3_|hada_|lokr_|\.adapter\.)", key):
            continue
        key = key.replace(".base_layer.", ".").replace(".mlp.mlp.", ".mlp.").replace(".output.output.", ".output.")
        out[key] = value
    return out


def test_rank_sweeps_every_method_with_a_rank_the_same_way():
    ranked = [name for name in method_names() if compose([f"peft={name}"]).peft.get("rank") is not None]
    assert {"mapper", "lora", "adapter"} <= set(ranked)
    for name in ranked:
        cfg = compose([f"peft={name}", "peft.rank=4"])
        assert instantiate(cfg.peft).rank == 4
    four, eight = tiny_with("lora", "peft.rank=4"), tiny_with("lora", "peft.rank=8")
    a4 = four.vision.layers[1].attn.qkv.lora_A["default"].weight
    assert a4.shape[0] == 4 and eight.vision.layers[1].attn.qkv.lora_A["default"].weight.shape[0] == 8
    assert tiny_with("adapter", "peft.rank=4").text.layers[1].output.adapter.down.out_features == 4


def test_layers_come_from_config_or_the_model_default():
    model = tiny_with("lora", "peft.vision_layers=[0]", "peft.text_layers=[2,3]")
    names = [n for n in model.tunable_backbone_names]
    assert {int(re.search(r"blocks\.(\d+)\.", n).group(1)) for n in names if n.startswith("vision.")} == {0}
    assert {int(re.search(r"layer\.(\d+)\.", n).group(1)) for n in names if n.startswith("text.")} == {2, 3}
    with pytest.raises(ValueError, match=r"layers \[9\]"):
        tiny_with("adapter", "peft.vision_layers=[9]")


def test_peft_library_settings_are_checked():
    with pytest.raises(ValueError, match="has no fields"):
        LibraryPeft(settings={"lora_alphaa": 3})
    with pytest.raises(ValueError, match="no rank field"):
        LibraryPeft(config_class="peft.IA3Config", rank=8)
    with pytest.raises(ValueError, match="not a config class of the peft library"):
        LibraryPeft(config_class="peft.NoSuchConfig")
    with pytest.raises(ValueError, match="among vision_targets"):
        LibraryPeft(config_class="peft.IA3Config", rank=None, vision_feedforward=["mlp.fc2"])
    with pytest.raises(ValueError, match="VERA"):  # shared tuner state: peft refuses in-place injection
        build_grounder(LibraryPeft(config_class="peft.VeraConfig", rank=4), **TINY_MODEL)


def test_lora_dropout_keeps_training_mode_while_frozen_backbone_dropout_is_off():
    model = tiny_with("lora", "peft.settings.lora_dropout=0.1").train()
    lora_dropouts = [m for n, m in model.named_modules() if ".lora_dropout." in n]
    assert lora_dropouts and all(m.training for m in lora_dropouts)
    assert all(not m.training for m, _ in model.backbone_modules)
    # attention dropout follows the attention module's own flag (HF BERT, timm): off in the frozen BERT
    assert all(not layer.attention.self.training for layer in model.text.layers)


def test_every_training_epoch_starts_with_the_grounders_own_train_mode():
    module = module_for("lora")  # as built: every module in training mode, frozen backbones included
    assert any(m.training for m, _ in module.model.backbone_modules)
    module.on_train_epoch_start()  # Lightning 2 never calls train() itself
    assert module.model.training and not any(m.training for m, _ in module.model.backbone_modules)


def test_frozen_backbone_attention_dropout_is_off_in_clean_mode_and_on_in_official():
    for mode, expected in (("clean", False), ("official", True)):
        model = tiny_with("lora", mode=mode).train()
        attention = [m for n, m in model.named_modules() if n.startswith("text.") and n.endswith("attention.self")]
        assert attention and all(m.training is expected for m in attention), mode


def test_bottleneck_placements():
    adapter = build_grounder(Adapter(rank=4), **TINY_MODEL)
    former = build_grounder(AdaptFormer(rank=4), **TINY_MODEL)
    assert adapter.vision.layers[1].mlp.placement == "serial" and adapter.text.layers[1].output.placement == "serial"
    assert former.vision.layers[1].mlp.placement == "parallel" and former.text.layers[1].output.placement == "parallel"
    assert former.vision.layers[1].mlp.adapter.scale == pytest.approx(0.1)
    # a non-zero adapter changes a serial and a parallel block differently (each reads its own input)
    for model in (adapter, former):
        torch.nn.init.normal_(model.vision.layers[1].mlp.adapter.up.weight)
    u = torch.randn(1, 5, 32)
    block_a, block_f = adapter.vision.layers[1].mlp, former.vision.layers[1].mlp
    m = block_a.mlp(u)
    torch.testing.assert_close(block_a(u), m + block_a.adapter(m))
    torch.testing.assert_close(block_f(u), block_f.mlp(u) + block_f.adapter(u))


def test_mapper_ablations_remove_one_component_each():
    full = tiny_with("mapper")
    no_dypa = tiny_with("mapper_no_dypa")
    no_loca = tiny_with("mapper_no_loca")
    no_pgt = tiny_with("mapper_no_pgt")
    no_prior = tiny_with("mapper_no_prior")

    def has(model, part):
        return any(part in n for n in model.tunable_backbone_names)

    assert has(full, "blocks.1.mlp.adapter") and has(full, "layer.1.output.adapter") and full.text_merge is not None
    assert not has(no_dypa, "output.adapter") and has(no_dypa, "mlp.adapter") and no_dypa.prior is not None
    assert not has(no_loca, "mlp.adapter") and has(no_loca, "output.adapter")
    assert no_pgt.text_merge is None and has(no_pgt, "output.adapter")
    assert no_prior.prior is None and no_prior.text_merge is None
    dypa = no_prior.text.layers[1].output.adapter
    assert isinstance(dypa, DyPA) and dypa.scale is None  # no prior gate: a plain bottleneck
    x = inputs()
    assert no_prior(**x).boxes.shape == (2, 4)
    with pytest.raises(ValueError, match="needs prior=true"):
        Mapper(prior=False)
    with pytest.raises(ValueError, match="peft=frozen"):
        Mapper(loca=False, dypa=False, pgt=False)


def test_ablation_counts_add_up_at_full_size():
    """LoCA + DyPA + PGT = MaPPER's 2,724,795 tunable backbone parameters (clean mode, meta device)."""
    from src.params import parameter_report

    counts = {}
    for name in ("mapper", "mapper_no_dypa", "mapper_no_loca", "mapper_no_pgt"):
        cfg = compose(["model=mapper_base", "model.pretrained=false", f"peft={name}"])
        with torch.device("meta"):
            model = instantiate(cfg.model, _partial_=True)(peft=instantiate(cfg.peft))
        counts[name] = parameter_report(model)["tunable_backbone"]
    dypa = counts["mapper"] - counts["mapper_no_dypa"]
    loca = counts["mapper"] - counts["mapper_no_loca"]
    pgt = counts["mapper"] - counts["mapper_no_pgt"]
    assert counts["mapper"] == 2_724_795
    assert (loca, dypa, pgt) == (1_581_912, 208_323 - 3 * 16_416, 983_808)


def test_official_mode_mapper_is_unchanged_by_the_switches():
    official = tiny_with("mapper", mode="official")
    assert official.text.layers[1].output.placement == "parallel_after_norm"
    assert official.text.layers[1].output.adapter.unused_prior_down is not None
    copy.deepcopy(official)  # the dropout bookkeeping survives copies


@pytest.mark.parametrize("name", ["mapper", "lora", "adapter"])
def test_frozen_backbones_are_deterministic_in_training_mode_in_clean_mode(name: str):
    model = tiny_with(name).train()
    batch = inputs()
    with torch.no_grad():
        prior = model._prior(batch["text_ids"], batch["text_mask"], batch["prior_ids"], batch["prior_mask"])
        for backbone, run in (("vision", lambda: model.vision(batch["image"])),
                              ("text", lambda: model.text(batch["text_ids"], batch["text_mask"], condition=prior)),
                              ("prior", lambda: model._prior(batch["text_ids"], batch["text_mask"],
                                                             batch["prior_ids"], batch["prior_mask"]))):
            if backbone != "prior" or model.prior is not None:  # LoRA and Adapter are built without the prior
                assert torch.equal(run(), run()), f"{name}: two training-mode passes of the frozen {backbone} differ"
    official = tiny_with(name, mode="official").train()  # the official BERT keeps its dropout
    with torch.no_grad():
        prior = official._prior(batch["text_ids"], batch["text_mask"], batch["prior_ids"], batch["prior_mask"])
        first = official.text(batch["text_ids"], batch["text_mask"], condition=prior)
        assert not torch.equal(first, official.text(batch["text_ids"], batch["text_mask"], condition=prior))
