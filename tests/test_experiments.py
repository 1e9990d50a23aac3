"""Every experiment config composes, builds and trains for one step at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from src.config import CONFIG_DIR, compose
from src.run import build_module, build_trainer

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("_"))
RECIPES = sorted(p.stem[1:] for p in (CONFIG_DIR / "experiment").glob("_*.yaml"))
METHODS = sorted(p.stem for p in (CONFIG_DIR / "peft").glob("*.yaml"))
# One step of training for every method (on RefCOCO's recipe) and for every recipe (with MaPPER).
ONE_STEP = sorted({n for n in EXPERIMENTS if n.endswith("_refcoco")} | {f"mapper_{r}" for r in RECIPES}
                  | {"mapper_synthetic"})

TINY_DATA = [
    "data=synthetic", "data.synthetic.n_train=8", "data.synthetic.n_val=4", "data.synthetic.n_test=4",
    "data.num_workers=0", "data.batch_size=4",
]


def test_there_are_experiments_for_every_benchmark_and_method():
    assert set(RECIPES) == {"refcoco", "refcoco+", "refcocog", "refcocog_google", "referit", "flickr", "synthetic"}
    for method in ("mapper", "lora", "dora", "ia3", "adapter", "adaptformer", "full", "frozen"):
        assert {f"{method}_{r}" for r in RECIPES} <= set(EXPERIMENTS), method
    assert {f"mapper_no_{c}_refcoco" for c in ("dypa", "loca", "pgt", "prior")} <= set(EXPERIMENTS)
    assert {f"{m}_synthetic" for m in METHODS} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_its_recipe_and_method(name: str):
    cfg = compose([f"+experiment={name}"])
    assert cfg.task_name == name
    assert cfg.data._target_.endswith("GroundingDataModule")
    assert cfg.model.max_query_len in (16, 20, 40)
    method, recipe = next((m, name[len(m) + 1:]) for m in sorted(METHODS, key=len, reverse=True)
                          if name.startswith(m + "_") and name[len(m) + 1:] in RECIPES)
    assert cfg.peft == compose([f"peft={method}"]).peft
    base = compose([f"+experiment=_{recipe}"])
    for key in ("data", "model", "optim", "trainer", "loss"):
        assert cfg[key] == base[key], key


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if not n.endswith("_synthetic")])
def test_paper_experiments_keep_the_official_recipe(name: str):
    """The default job's tuned loss weights and backbone pretraining never leak into a paper recipe."""
    cfg = compose([f"+experiment={name}"])
    module = build_module(compose([f"+experiment={name}", "model=mapper_tiny"]))
    assert (module.loss.l1_weight, module.loss.giou_weight) == (1.0, 1.0)
    assert cfg.vision_pretraining is None and cfg.text_pretraining is None
    assert cfg.model.pretrained


@pytest.mark.parametrize("name", ONE_STEP)
def test_experiment_trains_one_step_at_tiny_size(name: str, tmp_path: Path):
    """Keep the experiment's PEFT method, optimiser, mode and query length; shrink model, data, trainer."""
    cfg = compose([
        f"+experiment={name}", "model=mapper_tiny", "trainer=default", "logger=none", f"paths.cache_dir={tmp_path}",
        f"paths.output_dir={tmp_path}", *TINY_DATA, "+trainer.fast_dev_run=1", "trainer.accelerator=cpu",
    ])
    with open_dict(cfg):
        cfg.callbacks = {}
    expected_len = compose([f"+experiment={name}"]).model.max_query_len
    assert cfg.model.max_query_len == expected_len
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert all(p.isfinite().all() for p in module.model.parameters())
