"""Methods by name: every method config builds a registered method through one builder; names in a stored
config import nothing; checkpoints from before the registry still load, trusted, with their recipes'
fingerprints; plugins; the README's method table is the registry's."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from hydra._internal.utils import _locate
from hydra.utils import instantiate
from PIL import Image

from src import predict
from src.analysis.table import METHOD_CLASSES, RESULTS_NAME, recipe_id, run_recipe
from src.config import LEGACY_METHOD_TARGETS, METHOD_BUILDER, compose
from src.errors import ConfigError, UnsafeFileError, as_user_error
from src.methods import facts, markdown, method_names
from src.models.peft.registry import build_method, register_method, registered_methods
from src.run import build_seeded_module, resolved, run
from src.storage.trust import check_stored_config
from tests.test_checkpoints import save
from tests.test_default_job import TINY_JOB

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TABLE = re.compile(r"<!-- methods: python -m src.methods --markdown -->\n(.*?)\n<!-- end of methods -->", re.S)


def built_before_the_registry(peft: dict) -> dict:
    """A method config as the suite wrote it before the registry: the class as `_target_`, no names."""
    settings = {k: v for k, v in peft.items() if k not in ("_target_", "name", "method")}
    return {"_target_": METHOD_CLASSES[peft["method"]], **settings}


@pytest.mark.parametrize("name", method_names())
def test_every_method_config_names_itself_and_builds_a_registered_method(name: str) -> None:
    cfg = compose([f"peft={name}"])
    assert cfg.peft._target_ == METHOD_BUILDER and cfg.peft.name == name
    assert type(instantiate(cfg.peft)) is registered_methods()[cfg.peft.method]


def test_the_builder_and_legacy_targets_are_the_registrys() -> None:
    assert _locate(METHOD_BUILDER) is build_method
    methods = registered_methods()
    for target, method in LEGACY_METHOD_TARGETS.items():
        assert _locate(target) is methods[method], target


def test_unknown_methods_and_settings_are_one_line_naming_the_key() -> None:
    with pytest.raises(Exception) as raised:  # Hydra wraps what the builder raises
        instantiate(compose(["peft=lora", "peft.method=nope"]).peft)
    assert str(as_user_error(raised.value)).startswith(
        f"peft.method='nope' is not a registered PEFT method; registered: {', '.join(sorted(registered_methods()))}. "
        "A method of your own registers when its module is in `plugins`")
    with pytest.raises(Exception) as raised:
        instantiate(compose(["peft=mapper", "+peft.loca_hiden=3"]).peft)
    assert str(as_user_error(raised.value)).startswith(
        "peft.loca_hiden: peft=mapper builds method 'mapper', which has no setting 'loca_hiden'; its settings: ")


def test_a_name_is_registered_once() -> None:
    assert "mapper" in registered_methods()
    with pytest.raises(ConfigError, match="'mapper' is registered twice"):
        register_method("mapper")(type("Other", (), {}))


def test_plugins_must_be_importable_module_names() -> None:
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_plugin' \(No module named"):
        compose(["plugins=[no_such_plugin]"])
    with pytest.raises(ConfigError, match="plugins must be a list of module names"):
        compose(["plugins=no_such_plugin"])


def test_a_stored_method_name_imports_nothing_and_must_be_registered() -> None:
    stored = {"peft": {"_target_": METHOD_BUILDER, "name": "x", "method": "os.system"}}
    with pytest.raises(UnsafeFileError, match=r"`peft.method` names 'os.system', which is not a registered PEFT "
                                              r"method .*: nothing was imported.*plugins"):
        check_stored_config(stored, ["peft"], {}, "x.ckpt")
    for target in LEGACY_METHOD_TARGETS:  # what checkpoints named before the registry
        check_stored_config({"peft": {"_target_": target}}, ["peft"], {}, "x.ckpt")


@pytest.mark.parametrize("name", method_names())
def test_a_recipe_keeps_its_fingerprint_across_the_registry(name: str) -> None:
    """The same settings written before the registry (class as target, no names) give the same recipe."""
    config = resolved(compose([f"peft={name}"]))
    if config["peft"]["method"] not in METHOD_CLASSES:
        pytest.skip(f"{name} builds a method the suite did not have before the registry")
    old = copy.deepcopy(config) | {"peft": built_before_the_registry(config["peft"])}
    old["data"] = {k: v for k, v in old["data"].items() if k != "name"}
    old |= {"task_name": "train", "tags": ["default"]}
    del old["plugins"]
    assert recipe_id(run_recipe(config)) == recipe_id(run_recipe(old))
    renamed = copy.deepcopy(config)
    renamed["peft"]["name"] = "renamed"
    assert run_recipe(renamed) == run_recipe(config)


def test_the_readme_method_table_is_the_registrys() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    found = TABLE.search(readme)
    assert found, "README.md has no methods table between its markers"
    assert found.group(1) == markdown([facts(name) for name in method_names()]), (
        "README.md's method table is out of date: replace it with `python -m src.methods --markdown`")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small (untrained) DoRA checkpoint as the suite writes it, and the same as written before the
    registry (its stored method config naming the class, its run named as then)."""
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = compose(["peft=dora", "vision_pretraining=null", "text_pretraining=null", "paths.output_dir=unused"])
    new = save(build_seeded_module(cfg), folder / "dora.ckpt")
    checkpoint = torch.load(new, weights_only=True)
    config = checkpoint["config"]
    config["peft"] = built_before_the_registry(config["peft"])
    config["data"].pop("name")
    config |= {"task_name": "train", "tags": ["default"]}
    del config["plugins"]
    checkpoint["choices"] = {"model": "mapper_tiny", "peft": "dora"}  # what `python -m src.run peft=dora` records
    torch.save(checkpoint, folder / "old.ckpt")
    return new, folder / "old.ckpt"


def test_checkpoints_from_before_the_registry_predict_as_before(checkpoints: tuple[Path, Path], tmp_path: Path):
    new, old = checkpoints
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    query = [predict.Query(image, "the left one")]
    [ours], [theirs] = (predict.Predictor(path).predict(query) for path in (new, old))
    assert ours.box == theirs.box


def test_checkpoints_from_before_the_registry_evaluate_under_their_method_name(checkpoints: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    _, old = checkpoints
    common = [f"paths.cache_dir={tmp_path / 'cache'}", *TINY_JOB, "logger=csv", "visualize=0",
              "shuffled_text_check=false", "train=false", f"ckpt_path={old}"]
    run(compose([*common, f"paths.output_dir={tmp_path / 'eval'}"]))
    line = json.loads((tmp_path / "eval" / RESULTS_NAME).read_text())
    assert (line["method"], line["experiment"], line["kind"]) == ("dora", "dora_synthetic", "evaluation")
    stored = torch.load(old, weights_only=True)
    stored.pop("choices")  # written before the choices were recorded too: named after its method
    torch.save(stored, tmp_path / "older.ckpt")
    run(compose([*common[:-1], f"ckpt_path={tmp_path / 'older.ckpt'}", f"paths.output_dir={tmp_path / 'eval2'}"]))
    line = json.loads((tmp_path / "eval2" / RESULTS_NAME).read_text())
    assert (line["method"], line["experiment"]) == ("peft_library", "peft_library_synthetic")

