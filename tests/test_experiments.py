"""Every benchmark's recipe composes with every method, names its runs after both, and trains one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import open_dict

from src.config import CONFIG_DIR, compose
from src.methods import method_names
from src.run import build_module, build_trainer

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
BENCHMARKS = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml") if not p.stem.startswith("_"))
# `+experiment=<benchmark>`: a benchmark's recipe; every other experiment is one of MaPPER's published runs.
RECIPES = [name for name in EXPERIMENTS if name in BENCHMARKS]
PUBLISHED = [name for name in EXPERIMENTS if name not in BENCHMARKS]
# One step of training for every method (on RefCOCO's recipe) and for every recipe (with MaPPER).
ONE_STEP = sorted({("refcoco", m) for m in method_names()} | {(r, "mapper") for r in RECIPES})

TINY_DATA = [
    "data=synthetic", "data.synthetic.n_train=8", "data.synthetic.n_val=4", "data.synthetic.n_test=4",
    "data.num_workers=0", "data.batch_size=4",
]


def test_every_benchmark_has_a_recipe_and_every_published_run_is_mapper_on_one():
    assert set(RECIPES) == set(BENCHMARKS) - {"custom"}  # your own data (custom) has no recipe of its own
    for name in PUBLISHED:
        assert name.startswith("mapper_"), name
        defaults = yaml.safe_load((CONFIG_DIR / "experiment" / f"{name}.yaml").read_text())["defaults"]
        assert defaults[0] in RECIPES and defaults[1:] == [{"override /peft": "mapper"}], name
        assert compose([f"+experiment={name}"]) == compose([f"+experiment={defaults[0]}", "peft=mapper"])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_with_any_method(name: str):
    cfg = compose([f"+experiment={name}"])
    assert cfg.data.name == name and cfg.data._target_.endswith("GroundingDataModule")
    assert cfg.model.max_query_len in (16, 20, 40)
    assert cfg.peft == compose(["peft=mapper"]).peft  # the default method
    lora = compose([f"+experiment={name}", "peft=lora"])
    assert lora.peft == compose(["peft=lora"]).peft
    for key in ("data", "model", "optim", "trainer", "loss"):
        assert lora[key] == cfg[key], key


def test_run_names_are_the_method_and_benchmark_chosen():
    """Never an experiment file's: a later override of the method names the run after that method."""
    assert compose([]).task_name == "mapper_synthetic"
    for overrides, name in ((["+experiment=mapper_refcoco", "peft=lora"], "lora_refcoco"),
                            (["+experiment=refcoco+", "peft=mapper_no_pgt"], "mapper_no_pgt_refcoco+"),
                            (["+experiment=mapper_refcocog"], "mapper_refcocog_umd"),
                            (["+experiment=refcoco", "data=referit"], "mapper_referit")):
        cfg = compose(overrides)
        assert cfg.task_name == name and list(cfg.tags) == [cfg.peft.name, cfg.data.name], overrides
    assert compose(["peft=lora", "task_name=study"]).task_name == "study"  # still a setting of its own


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_experiments_keep_the_official_recipe(name: str):
    """The default job's tuned loss weights and backbone pretraining never leak into a paper recipe (one on
    the pretrained backbones: every published run's)."""
    cfg = compose([f"+experiment={name}"])
    assert cfg.model.pretrained or name not in PUBLISHED
    if not cfg.model.pretrained:
        pytest.skip(f"{name} trains random-init backbones: not a paper recipe")
    module = build_module(compose([f"+experiment={name}", "model=mapper_tiny"]))
    assert (module.loss.l1_weight, module.loss.giou_weight) == (1.0, 1.0)
    assert cfg.vision_pretraining is None and cfg.text_pretraining is None


@pytest.mark.parametrize(("recipe", "method"), ONE_STEP)
def test_experiment_trains_one_step_at_tiny_size(recipe: str, method: str, tmp_path: Path):
    """Keep the recipe's optimiser, mode and query length and the method; shrink model, data, trainer."""
    cfg = compose([
        f"+experiment={recipe}", f"peft={method}", "model=mapper_tiny", "trainer=default", "logger=none",
        f"paths.cache_dir={tmp_path}", f"paths.output_dir={tmp_path}", *TINY_DATA, "+trainer.fast_dev_run=1",
        "trainer.accelerator=cpu",
    ])
    with open_dict(cfg):
        cfg.callbacks = {}
    expected_len = compose([f"+experiment={recipe}"]).model.max_query_len
    assert cfg.model.max_query_len == expected_len
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert all(p.isfinite().all() for p in module.model.parameters())


def test_the_petl_benchmark_asks_for_what_its_backbones_never_saw(tmp_path: Path):
    """data=synthetic_shift: colours, shapes and every size / position / relation word of the grounding phrases
    are absent from the phrases the backbones pretrain on (experiments/petl_comparison/README.md)."""
    import torch

    from src.data.synthetic import record_attributes, split_path

    cfg = compose(["+experiment=synthetic_shift", f"paths.cache_dir={tmp_path}", "data.synthetic.n_train=60",
                   "data.synthetic.n_val=2", "data.synthetic.n_test=2", "pretraining_corpus.scenes=60"])
    datamodule = instantiate(cfg.data)

    def split(root: Path) -> list:
        return torch.load(split_path(root, "train"), weights_only=True)

    corpus = split(datamodule.pretraining_corpus(**cfg.pretraining_corpus))
    benchmark = split(datamodule.generated_root())
    words = [{w for r in records for w in r[3].split()} for records in (corpus, benchmark)]
    assert {"yellow", "purple", "orange", "diamond", "star", "cross"} <= words[1] - words[0]
    assert {"left", "right", "big", "small"} <= words[1] - words[0]
    seen = {o["colour"] for r in corpus for o in record_attributes(r)["scene"]["objects"]}
    assert seen == {"red", "green", "blue"}
    kinds = [record_attributes(r)["expression"]["kind"] for r in benchmark]
    assert kinds.count("np") < 0.7 * len(kinds)  # most of what the default job asks is attributes only (0.8)
