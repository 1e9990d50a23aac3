"""Small checkpoints: only what trains + config; exact round trips; clear refusals of other configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from src.analysis.table import RESULTS_NAME, summarise
from src.config import compose
from src.methods import method_names
from src.run import build_module, run
from src.storage.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointMismatchError,
    export_safetensors,
    load_into,
    read_checkpoint,
    trainable_state,
)
from tests.conftest import TINY_MODEL, at_test_size
from tests.test_default_job import TINY_JOB
from tests.test_model import inputs


def module_for(peft: str, *overrides: str, seed: int = 0):
    """A tiny GroundingModule as `src.run` builds it, its method at test size, frozen backbones from `seed`."""
    cfg = at_test_size(compose([f"peft={peft}", *overrides]), overrides)
    with open_dict(cfg):
        cfg.model = OmegaConf.merge(cfg.model, TINY_MODEL)
        cfg.paths.output_dir = "unused"
    torch.manual_seed(seed)
    return build_module(cfg)


def pretend_training(module) -> None:
    """Move every trainable tensor and BatchNorm statistic away from its initial value."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in module.model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.add_(torch.rand(b.shape, generator=g))


def save(module, path: Path) -> Path:
    """What Lightning's checkpointing writes: the module's state dict, passed through its save hook."""
    checkpoint = {"state_dict": module.state_dict(), "epoch": 3}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("peft", method_names())
def test_round_trip_gives_identical_outputs(peft: str, tmp_path: Path):
    trained = module_for(peft)
    pretend_training(trained)
    path = save(trained, tmp_path / "run.ckpt")
    state, config, prints = read_checkpoint(path)
    assert config["peft"]["name"] == trained.config["peft"]["name"] == peft
    fresh = module_for(peft)  # the frozen backbones are rebuilt from config (same seed), never stored
    load_into(fresh.model, state, prints, str(path))
    x = inputs()
    trained.eval(), fresh.eval()
    assert torch.equal(trained.model(**x).boxes, fresh.model(**x).boxes)
    for (key, a), b in zip(trained.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_checkpoint_holds_only_what_trains_plus_batchnorm_statistics(tmp_path: Path):
    module = module_for("mapper")
    state, _, prints = read_checkpoint(save(module, tmp_path / "m.ckpt"))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    extra = set(state) - trainable
    assert extra and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in extra)
    assert not any(k.startswith(("vision.vit.patch_embed", "text.bert.embeddings", "prior.")) for k in state)
    assert set(prints) == set(module.model.state_dict()) - set(state)  # every rebuilt tensor is fingerprinted
    frozen_bytes = sum(p.numel() * 4 for p in module.model.parameters() if not p.requires_grad)
    assert sum(v.numel() * 4 for v in state.values()) < frozen_bytes / 4
    assert set(trainable_state(module.model)) == set(state)


def test_checkpoint_of_another_method_is_refused_with_the_keys_listed(tmp_path: Path):
    path = save(module_for("lora"), tmp_path / "lora.ckpt")
    state, _, prints = read_checkpoint(path)
    with pytest.raises(CheckpointMismatchError) as err:
        load_into(module_for("adapter").model, state, prints, str(path))
    text = str(err.value)
    assert "missing (the model trains them)" in text and "adapter.down.weight" in text
    assert "unexpected" in text and "lora_A.default.weight" in text


def test_checkpoint_of_another_rank_is_refused_with_the_shapes(tmp_path: Path):
    path = save(module_for("lora", "peft.rank=4"), tmp_path / "r4.ckpt")
    state, _, prints = read_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch:[\s\S]*lora_A.default.weight: checkpoint \(4,"):
        load_into(module_for("lora", "peft.rank=8").model, state, prints, str(path))


def test_other_frozen_backbones_are_refused(tmp_path: Path):
    path = save(module_for("lora", seed=0), tmp_path / "s0.ckpt")
    state, _, prints = read_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match="frozen backbone tensors rebuilt from the config differ"):
        load_into(module_for("lora", seed=1).model, state, prints, str(path))


def test_lightning_restore_checks_keys_before_loading(tmp_path: Path):
    path = save(module_for("lora"), tmp_path / "lora.ckpt")
    target = module_for("adapter")
    with pytest.raises(CheckpointMismatchError, match="missing"):
        target.on_load_checkpoint(torch.load(path, weights_only=True))


def test_safetensors_export_round_trip(tmp_path: Path):
    trained = module_for("mapper")
    pretend_training(trained)
    ckpt = save(trained, tmp_path / "m.ckpt")
    out = export_safetensors(ckpt, tmp_path / "m.safetensors")
    a, b = read_checkpoint(ckpt), read_checkpoint(out)
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1] == b[1] and a[2] == b[2]
    raw = torch.load(ckpt, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["epoch"] == 3


@pytest.mark.slow
def test_evaluating_a_checkpoint_needs_nothing_but_the_checkpoint(tmp_path: Path):
    """Train a LoRA job; `train=false ckpt_path=...` with the default (MaPPER) config reproduces its test
    numbers from the .ckpt and from the exported .safetensors."""
    common = [f"paths.cache_dir={tmp_path / 'cache'}", *TINY_JOB, "logger=csv", "visualize=0"]
    first = compose([*common, f"paths.output_dir={tmp_path / 'train'}", "peft=lora", "seed=5"])
    run(first)
    trained = json.loads((tmp_path / "train" / "results.json").read_text())
    ckpt = trained["best_checkpoint"]
    assert Path(ckpt).stat().st_size < 2_000_000
    exported = export_safetensors(ckpt, tmp_path / "lora.safetensors")
    for i, path in enumerate((ckpt, exported)):
        out = tmp_path / f"eval{i}"
        run(compose([*common, f"paths.output_dir={out}", "train=false", f"ckpt_path={path}"]))
        again = json.loads((out / "results.json").read_text())
        assert again["config"]["peft"]["name"] == "lora" and again["config"]["seed"] == 5
        assert again["splits"] == trained["splits"]
        assert again["shuffled_text"] == trained["shuffled_text"]
    # Their results lines: evaluations of the same weights (the .ckpt and its export), in the training run's
    # recipe (evaluated as it was tested), counted once in the table.
    lines = [json.loads((tmp_path / name / RESULTS_NAME).read_text()) for name in ("train", "eval0", "eval1")]
    assert [line["kind"] for line in lines] == ["training", "evaluation", "evaluation"]
    assert lines[1]["weights"] == lines[2]["weights"] and lines[0]["weights"] is None
    assert lines[0]["recipe"] == lines[1]["recipe"] == lines[2]["recipe"]
    assert [(e["kind"], e["runs"]) for e in summarise(lines)] == [("training", 1), ("evaluation", 1)]
