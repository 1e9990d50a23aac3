"""A checkpoint is data: its stored config may only name the suite's own classes, and nothing it names
otherwise is ever imported or called (by `src.run train=false ckpt_path=...` or `src.predict`)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra._internal.utils import _locate
from safetensors import safe_open
from safetensors.torch import save_file

from src import predict
from src.config import CONFIG_DIR, compose
from src.errors import UnsafeFileError, as_user_error
from src.run import build_seeded_module, run
from src.storage.checkpoints import export_safetensors, read_checkpoint
from src.storage.trust import TRUSTED_TARGETS, check_stored_config
from tests.test_checkpoints import save

# A callable that writes a file of the caller's choosing: what an attacker's `_target_` would name.
WRITES_A_FILE = "numpy.savetxt"


def conf_targets(group: str) -> set[str]:
    """The top-level `_target_` of every file of a conf/ group (the loss: conf/config.yaml's `loss`)."""
    if group == "loss":
        return {yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())["loss"]["_target_"]}
    found = set()
    for path in (CONFIG_DIR / group).glob("*.yaml"):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if target:
            found.add(target)
    return found


@pytest.mark.parametrize("group", sorted(TRUSTED_TARGETS))
def test_trusted_table_is_what_the_suites_conf_names(group: str) -> None:
    assert conf_targets(group) == TRUSTED_TARGETS[group]
    for target in TRUSTED_TARGETS[group]:
        assert callable(_locate(target)), target


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small (untrained) LoRA checkpoint of the tiny default model, as the suite writes it."""
    cfg = compose(["peft=lora", "vision_pretraining=null", "text_pretraining=null", "paths.output_dir=unused"])
    return save(build_seeded_module(cfg), tmp_path_factory.mktemp("ckpt") / "lora.ckpt")


def tampered(source: Path, out: Path, change) -> Path:
    """`source` with `change(config)` applied to its stored config, written as .ckpt or .safetensors."""
    if out.suffix == ".safetensors":
        plain = export_safetensors(source, out.with_name("plain.safetensors"))
        with safe_open(str(plain), framework="pt") as f:
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        config = json.loads(meta["config"])
        change(config)
        save_file(tensors, str(out), metadata=meta | {"config": json.dumps(config)})
        return out
    checkpoint = torch.load(source, weights_only=True)
    change(checkpoint["config"])
    torch.save(checkpoint, out)
    return out


def foreign_targets(marker: Path) -> dict:
    """Where a checkpoint could name foreign code: the model, the method, deeper inside the model, the data."""
    call = {"_target_": WRITES_A_FILE, "fname": str(marker), "X": [1.0]}

    def in_model(config):
        config["model"] = call

    def in_peft(config):
        config["peft"] = call

    def nested(config):
        config["model"]["vision"]["extra"] = {"deeper": call}

    def in_data(config):
        config["data"]["_target_"] = WRITES_A_FILE

    return {"model": in_model, "peft": in_peft, "nested": nested, "data": in_data}


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("where", ["model", "peft", "nested", "data"])
def test_foreign_target_is_refused_and_never_called(lora_checkpoint: Path, tmp_path: Path, where: str,
                                                     suffix: str) -> None:
    marker = tmp_path / "written-by-the-checkpoint.txt"
    evil = tampered(lora_checkpoint, tmp_path / f"evil{suffix}", foreign_targets(marker)[where])
    key = {"model": "model._target_", "peft": "peft._target_", "nested": "model.vision.extra.deeper._target_",
           "data": "data._target_"}[where]
    with pytest.raises(UnsafeFileError, match=f"refused: its stored config key `{key}` names `{WRITES_A_FILE}`"):
        predict.Predictor(evil)
    assert not marker.exists()
    if where != "data":  # evaluation keeps the data configured on the command line
        cfg = compose(["train=false", f"ckpt_path={evil}", f"paths.output_dir={tmp_path / 'run'}", "logger=csv"])
        with pytest.raises(UnsafeFileError, match=f"`{key}`"):
            run(cfg)
        assert not marker.exists()


@pytest.fixture
def importable_marker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A module on sys.path that writes a marker file when imported."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "evil_peft.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Config: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    yield "evil_peft.Config", marker
    sys.modules.pop("evil_peft", None)


def test_peft_config_class_outside_peft_is_refused_and_never_imported(lora_checkpoint: Path, tmp_path: Path,
                                                                       importable_marker_module) -> None:
    name, marker = importable_marker_module
    evil = tampered(lora_checkpoint, tmp_path / "evil.ckpt", lambda c: c["peft"].update(config_class=name))
    with pytest.raises(UnsafeFileError, match=f"`peft.config_class` names '{name}'"):
        predict.Predictor(evil)
    cfg = compose(["peft=lora", f"peft.config_class={name}", "paths.output_dir=unused"])
    with pytest.raises(Exception) as raised:  # Hydra wraps what the method's constructor raises
        build_seeded_module(cfg)  # even the user's own config cannot make the bridge import a module
    assert "not a config class of the peft library" in str(as_user_error(raised.value))
    assert not marker.exists()


def test_interpolations_and_objects_in_a_stored_config_are_refused() -> None:
    with pytest.raises(UnsafeFileError, match=r"`model.text.weights` holds the interpolation '\$\{oc.env:HOME\}'"):
        check_stored_config({"model": {"text": {"weights": "${oc.env:HOME}"}}}, ["model"], {}, "x.ckpt")
    with pytest.raises(UnsafeFileError, match="`seed` holds a Tensor"):
        check_stored_config({"seed": torch.zeros(1)}, ["seed"], {}, "x.ckpt")


def test_a_users_own_target_is_trusted_only_where_the_user_configured_it() -> None:
    stored = {"peft": {"_target_": "mypkg.methods.MyMethod", "rank": 4}}
    check_stored_config(stored, ["peft"], {"peft": {"_target_": "mypkg.methods.MyMethod"}}, "x.ckpt")
    for configured in ({}, {"peft": {"_target_": "src.models.peft.mapper.Mapper"}},
                       {"model": {"_target_": "mypkg.methods.MyMethod"}}):
        with pytest.raises(UnsafeFileError, match="configure it yourself"):
            check_stored_config(stored, ["peft"], configured, "x.ckpt")


def test_suite_checkpoints_without_recorded_choices_still_load(lora_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(lora_checkpoint, weights_only=True)
    old = copy.deepcopy(checkpoint)
    old.pop("choices", None)
    torch.save(old, tmp_path / "old.ckpt")
    state, config, _ = read_checkpoint(tmp_path / "old.ckpt")
    assert config["peft"]["config_class"] == "peft.LoraConfig" and state
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 30)).save(image)
    [result] = predict.Predictor(tmp_path / "old.ckpt").predict([predict.Query(image, "the left one")])
    assert result.box is not None
