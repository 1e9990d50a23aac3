"""The optimiser's parameter groups: full fine-tuning trains the backbones' own weights at their own LR."""

from __future__ import annotations

import pytest

from src.config import compose
from src.run import build_module


def group_rates(*overrides: str) -> dict[str, tuple[float, set[int]]]:
    """Each optimiser group of the module `overrides` build: its LR and its tensors (by id)."""
    optimizer, _ = build_module(compose(list(overrides))).build_optimizer(total_steps=10)
    return {g["name"]: (g["initial_lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups}


def test_full_fine_tuning_trains_the_backbones_at_their_own_learning_rate():
    module = build_module(compose(["peft=full"]))  # the default job's recipe: one LR (6e-4) for the rest
    optimizer, _ = module.build_optimizer(total_steps=10)
    full = {g["name"]: (g["initial_lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups}
    assert set(full) == {"vision", "text", "head"}
    assert full["vision"][0] == full["text"][0] == pytest.approx(1e-4)  # optim=fast: a sixth of the rest's
    assert full["head"][0] == pytest.approx(6e-4)
    # every weight of both backbones, nothing else
    assert full["vision"][1] == {id(p) for p in module.model.vision.parameters()}
    assert full["text"][1] == {id(p) for p in module.model.text.parameters()}
    custom = group_rates("peft=full", "optim.full_backbone_lr=3e-5")
    assert custom["vision"][0] == custom["text"][0] == pytest.approx(3e-5)
    unset = group_rates("peft=full", "optim.full_backbone_lr=null")  # as before: the optimiser's own LR
    assert [lr for lr, _ in unset.values()] == pytest.approx([6e-4] * 3)
    paper = group_rates("peft=full", "optim=paper")
    assert paper["vision"][0] == paper["text"][0] == pytest.approx(1e-5) and paper["head"][0] == pytest.approx(1e-4)


def test_adapters_keep_the_learning_rate_of_their_recipe():
    """New modules inside the backbones are not the backbones' own weights: full_backbone_lr leaves them alone."""
    for method in ("mapper", "lora"):
        fast = group_rates(f"peft={method}")
        assert [lr for lr, _ in fast.values()] == pytest.approx([6e-4] * len(fast))
        paper = group_rates(f"peft={method}", "optim=paper", "optim.group_lr.vision=2e-5")
        assert paper["vision"][0] == pytest.approx(2e-5) and paper["text"][0] == pytest.approx(1e-5)
    assert set(group_rates("peft=frozen")) == {"head"}
