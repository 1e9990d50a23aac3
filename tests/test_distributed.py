"""DDP and mixed precision, tested on CPU: exact distributed evaluation, 2-process training equivalence,
official mode under DDP, every method's gradients, a bf16 training step, and the refused precisions.

The multi-process tests run `python -m src.run` in a subprocess with `trainer.strategy=ddp
trainer.devices=2 trainer.accelerator=cpu` (gloo): Lightning's `ddp` re-launches the command for rank 1,
which cannot happen inside pytest itself.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from src.analysis.samples import SAMPLES_FILE, read_samples
from src.analysis.table import RESULTS_NAME
from src.config import compose
from src.methods import method_names
from src.run import build_seeded_module, trainer_settings
from src.storage.checkpoints import read_checkpoint, trainable_state
from tests.test_checkpoints import module_for, save
from tests.test_datamodule import make_benchmark_root, make_referit_root
from tests.test_model import inputs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BOX = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.5]])


def one_step_grads(module) -> dict[str, torch.Tensor | None]:
    """Gradients of every trainable parameter after one training forward and backward."""
    module.model.train()
    batch = inputs()
    loss = module.loss(module(batch).boxes, BOX.repeat(len(batch["image"]) // 2, 1))["loss"]
    loss.backward()
    return {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("peft", method_names())
def test_every_trainable_parameter_gets_a_gradient_so_plain_ddp_works(peft: str) -> None:
    grads = one_step_grads(module_for(peft))
    unused = [n for n, g in grads.items() if g is None]
    assert grads and not unused, f"{peft}: plain DDP would stop at the first backward: {unused[:5]}"


@pytest.mark.parametrize("overrides", [["model.mode=official"], ["model.quirks.dypa_official_init=true"]])
def test_the_model_knows_exactly_which_trainable_parameters_no_forward_uses(overrides: list[str]) -> None:
    module = module_for("mapper", *overrides)
    declared = sorted(module.model.unused_trainable_parameters())
    grads = one_step_grads(module)
    unused = sorted(n for n, g in grads.items() if g is None)
    assert unused and all(".unused_prior_down." in n for n in unused), unused  # its clip_down_proj
    assert declared == unused
    assert module_for("mapper").model.unused_trainable_parameters() == []


SEVERAL = ["trainer.accelerator=cpu", "trainer.devices=2"]


@pytest.mark.parametrize("trainer,expected", [
    (["trainer=ddp"], "ddp_find_unused_parameters_true"),
    (["trainer.strategy=ddp", *SEVERAL], "ddp_find_unused_parameters_true"),
    (["trainer.strategy=ddp_spawn", *SEVERAL], "ddp_spawn_find_unused_parameters_true"),
    (["trainer.strategy=auto", *SEVERAL], "ddp_find_unused_parameters_true"),
    (["trainer.strategy=auto", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2"],
     "ddp_find_unused_parameters_true"),
    (["trainer.strategy=auto", "trainer.devices=1"], None),
    (["trainer.strategy=ddp_find_unused_parameters_true", *SEVERAL], None),  # already what is needed
])
def test_find_unused_parameters_comes_from_the_model_for_every_ddp_like_strategy(trainer: list[str],
                                                                              expected: str | None) -> None:
    for model, unused in ((["model.mode=official"], True), (["model.quirks.dypa_official_init=true"], True),
                          ([], False)):
        module = module_for("mapper", *model)
        settings = trainer_settings(compose([*model, *trainer]), module)
        assert settings == ({"strategy": expected} if unused and expected else {}), (model, trainer)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_precisions_that_cast_every_weight_are_refused_clearly(precision: str) -> None:
    with pytest.raises(ValueError, match=f"trainer.precision={precision} is not supported.*bf16-mixed"):
        trainer_settings(compose([f"trainer.precision={precision}"]))


@pytest.mark.parametrize("peft", ["mapper", "lora"])
def test_bf16_training_step_is_finite_close_to_fp32_with_fp32_boxes(peft: str) -> None:
    module = module_for(peft, *(["peft.rank=4"] if peft == "mapper" else []))
    module.model.train()
    batch, target = inputs(), BOX.repeat(len(inputs()["image"]) // 2, 1)
    results = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        module.model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            boxes = module(batch).boxes
            losses = module.loss(boxes, target)
        losses["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])
        results[name] = (boxes, losses["loss"].detach(), grad)
    boxes, loss, grad = results["bf16"]
    assert boxes.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (boxes - results["fp32"][0]).abs().max() < 0.02
    assert abs(float(loss - results["fp32"][1])) < 0.02 * float(results["fp32"][1])
    assert torch.nn.functional.cosine_similarity(grad, results["fp32"][2], dim=0) > 0.99


def test_eval_fp32_disables_autocast_in_evaluation() -> None:
    module = module_for("lora")
    module.eval_fp32 = True
    module.model.eval()
    with torch.no_grad():
        reference = module(inputs()).boxes
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(module.evaluate(inputs()), reference)
            module.eval_fp32 = False
            assert not torch.equal(module.evaluate(inputs()), reference)


# ------------------------------------------------------------------------------- 2 processes (gloo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def src_run(out: Path, *overrides: str, devices: int = 1, strategy: str = "ddp") -> dict:
    """`python -m src.run` in a subprocess on CPU with `devices` processes; returns its results.json."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    ddp = [f"trainer.strategy={strategy}", f"trainer.devices={devices}"] if devices > 1 else ["trainer.devices=1"]
    cmd = [sys.executable, "-m", "src.run", "trainer.accelerator=cpu", *ddp, f"paths.output_dir={out}",
           "logger=csv", "visualize=0", "callbacks.progress_bar=null", *overrides]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def referit_data(root: Path) -> list[str]:
    return ["data=referit", f"data.split_root={root / 'splits'}", f"data.image_root={root / 'images'}",
            "data.test_splits=[val,test]", "data.num_workers=0", "data.augment.enabled=false",
            "vision_pretraining=null", "text_pretraining=null"]


@pytest.mark.slow
def test_two_processes_evaluate_every_sample_exactly_once(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path / "data", {"train": 2, "val": 5, "test": 7})  # odd sizes
    cfg = compose(["peft=lora", "vision_pretraining=null", "text_pretraining=null", "paths.output_dir=unused"])
    checkpoint = save(build_seeded_module(cfg), tmp_path / "lora.ckpt")
    evaluate = [*referit_data(root), "train=false", f"ckpt_path={checkpoint}", "data.batch_size=2",
                "shuffled_text_check=true"]
    one = src_run(tmp_path / "one", *evaluate)
    two = src_run(tmp_path / "two", *evaluate, devices=2)
    for split, n in (("val", 5), ("test", 7)):
        assert one["splits"][split]["n"] == two["splits"][split]["n"] == n
        assert two["splits"][split]["acc50"] == one["splits"][split]["acc50"]
        assert two["splits"][split]["miou"] == pytest.approx(one["splits"][split]["miou"], abs=1e-6)
        assert two["shuffled_text"][split]["acc50"] == one["shuffled_text"][split]["acc50"]
    # the per-sample record, gathered over both processes' unequal shares: every sample once, in index order
    records = {k: read_samples(tmp_path / k / SAMPLES_FILE) for k in ("one", "two")}
    lines = {k: json.loads((tmp_path / k / RESULTS_NAME).read_text())["sample_hits"] for k in ("one", "two")}
    assert lines["two"] == lines["one"] and set(lines["one"]) == {"val", "test"}
    for split, n in (("val", 5), ("test", 7)):
        assert records["two"][split].size == n and list(records["two"][split].index) == list(range(n))
        assert records["two"][split].iou == pytest.approx(records["one"][split].iou, abs=1e-6)


@pytest.mark.slow
def test_two_process_training_matches_one_process_at_the_same_global_batch(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path / "data", {"train": 16, "val": 3, "test": 1})
    # File order (no shuffle): process r of 2 takes records r, r+2, ..., so each global step of 2 x 4
    # sees the same 8 records as one process's batch of 8. LoRA has no BatchNorm and no dropout is
    # active (frozen backbones run in eval mode). Plain SGD, so that the weights differ exactly as
    # much as the gradients do (Adam's first steps are sign-like and would magnify rounding noise).
    train = [*referit_data(root), "peft=lora", "data.shuffle=false", "trainer.max_epochs=1", "test=false",
             "shuffled_text_check=false", "optim.optimizer._target_=torch.optim.SGD", "optim.optimizer.lr=0.5",
             "~optim.optimizer.weight_decay", "optim.scheduler=null"]
    src_run(tmp_path / "one", *train, "data.batch_size=8")
    src_run(tmp_path / "two", *train, "data.batch_size=4", devices=2)
    one, _, _ = read_checkpoint(tmp_path / "one" / "checkpoints" / "last.ckpt")
    two, _, _ = read_checkpoint(tmp_path / "two" / "checkpoints" / "last.ckpt")
    cfg = compose(["peft=lora", "vision_pretraining=null", "text_pretraining=null", "paths.output_dir=unused"])
    start = trainable_state(build_seeded_module(cfg).model)
    assert one.keys() == two.keys() == start.keys()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    differ = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 0.1 and differ < 1e-5, f"moved {moved}, 1 vs 2 processes differ by {differ}"
    # validation (3 records: 2 on one process, 1 on the other) is exact too, the loss included
    val = [[row for row in csv.DictReader((tmp_path / r / "csv" / "metrics.csv").open()) if row["val/loss"]][-1]
           for r in ("one", "two")]
    for key in ("val/loss", "val/acc50", "val/miou"):
        assert float(val[0][key]) == pytest.approx(float(val[1][key]), abs=1e-5), key


@pytest.mark.slow
def test_official_mode_trains_under_plain_ddp_config(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path / "data", {"train": 8, "val": 3, "test": 3})
    results = src_run(tmp_path / "run", *referit_data(root), "model.mode=official", "trainer=ddp",
                      "trainer.precision=32-true", "data.batch_size=2", "trainer.max_epochs=1",
                      "+trainer.limit_train_batches=2", "shuffled_text_check=false", devices=2)
    assert results["status"] == "ok" and results["config"]["model"]["mode"] == "official"
    assert results["splits"]["test"]["n"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_spawn", "auto"])
def test_a_model_with_unused_parameters_trains_under_ddp_spawn_and_auto(tmp_path: Path, strategy: str) -> None:
    root = make_referit_root(tmp_path / "data", {"train": 8, "val": 3, "test": 3})
    results = src_run(tmp_path / "run", *referit_data(root), "model.quirks.dypa_official_init=true",
                      "data.batch_size=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "test=false",
                      "shuffled_text_check=false", devices=2, strategy=strategy)
    assert results["status"] == "ok" and results["best_val_acc50"] is not None


@pytest.mark.slow
def test_a_nan_loss_on_one_process_stops_every_process_with_one_message(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path / "data", {"train": 16, "val": 3, "test": 3})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "src.run", "trainer.accelerator=cpu", "trainer.strategy=ddp", "trainer.devices=2",
           f"paths.output_dir={out}", "logger=csv", "visualize=0", "callbacks.progress_bar=null", *referit_data(root),
           "data.batch_size=2", "trainer.max_epochs=1", "loss._target_=tests.nan_loss.NaNLossOnRank", "+loss.rank=1",
           "+loss.at_call=3"]
    # before the all-rank stop, process 0 waited in the gradient all-reduce until the collective timeout
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    expected = "non-finite loss at global step 2 (epoch 0) on process(es) [1] of 2; process 1: loss terms"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1] and expected in errors[0], proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and expected in results["reason"]
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
    assert not leftover.stdout.strip(), "a process of the run is still alive"


def test_ddp_trainer_configs_compose() -> None:
    for trainer in ("cpu", "gpu", "ddp"):
        cfg = compose([f"trainer={trainer}"])
        with open_dict(cfg):
            assert cfg.trainer.devices is not None


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_the_gpu_precision_follows_the_model_mode(trainer: str) -> None:
    official = compose([f"trainer={trainer}", "model.mode=official"])
    assert (official.trainer.precision, official.eval_fp32) == ("16-mixed", True)  # as the official code
    clean = compose([f"trainer={trainer}"])
    assert (clean.trainer.precision, clean.eval_fp32) == ("bf16-mixed", False)
    chosen = compose([f"trainer={trainer}", "model.mode=official", "trainer.precision=bf16-mixed", "eval_fp32=false"])
    assert (chosen.trainer.precision, chosen.eval_fp32) == ("bf16-mixed", False)  # single values still override


def _build_with_a_count(cache: str, marker: str) -> str:
    """One of several processes asking for the same cache entry; each build leaves a line in `marker`."""
    import time

    from src.storage.weights_cache import cached_state_dict

    def train() -> dict[str, torch.Tensor]:
        with open(marker, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        return {"w": torch.ones(2)}

    return str(cached_state_dict(Path(cache), "probe", {"k": 1}, train))


def test_concurrent_processes_build_a_cache_entry_once(tmp_path: Path) -> None:
    import multiprocessing

    marker = tmp_path / "builds.txt"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        paths = pool.starmap(_build_with_a_count, [(str(tmp_path / "cache"), str(marker))] * 3)
    assert len(set(paths)) == 1 and Path(paths[0]).is_file()
    assert marker.read_text().count("built") == 1


def test_slurm_launcher_config_composes_for_a_multi_node_sweep() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from src.config import CONFIG_DIR

    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
                 "trainer=ddp", "trainer.devices=8", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.nodes == 2
    assert launcher.tasks_per_node == launcher.gpus_per_node == cfg.trainer.devices
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"


@pytest.mark.slow
def test_two_point_sweep_through_the_submitit_local_launcher(tmp_path: Path) -> None:
    from tests.test_default_job import TINY_JOB

    env = {**os.environ, "REC_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "src.run", "-m", "hydra/launcher=local", "seed=1,2", "trainer.max_epochs=1",
           "logger=csv", "visualize=0", "shuffled_text_check=false", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           *TINY_JOB[:-3]]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert sorted(json.loads(p.read_text())["config"]["seed"] for p in results) == [1, 2]
    assert list((tmp_path / "sweep" / ".submitit").iterdir()), "the jobs went through submitit"


@pytest.mark.slow
def test_paper_experiment_in_official_mode_takes_its_first_ddp_step_on_two_cpu_processes(tmp_path: Path) -> None:
    root = make_benchmark_root(tmp_path / "data", "unc", {"train": 4, "val": 2, "testA": 1, "testB": 1})
    results = src_run(
        tmp_path / "run", "+experiment=mapper_refcoco", "model.mode=official", "model.pretrained=false",
        "model.image_size=224", f"data.split_root={root / 'splits'}", f"data.image_root={root / 'images'}",
        "data.batch_size=1", "data.num_workers=0", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1", "test=false", "shuffled_text_check=false", devices=2)
    config = results["config"]
    assert results["status"] == "ok" and config["model"]["mode"] == "official"
    # official mode trains in fp16 AMP and evaluates in fp32, as the official code (Lightning runs bf16 on CPU)
    assert config["trainer"]["strategy"] == "ddp" and config["trainer"]["precision"] == "16-mixed"
    assert config["eval_fp32"] is True
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
