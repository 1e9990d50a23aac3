"""The suite's entry point: `python -m src.run [overrides]`.

Trains the configured model on the configured benchmark, keeps the best checkpoint by `val/acc50`,
tests it on every test split (keys `test_<split>/acc50`), optionally measures accuracy with the
expressions shuffled across samples, and writes results.json, predictions.png, CSV/W&B logs and the
checkpoint under the run folder. Returns the best `val/acc50` so that Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from src.backbone_pretraining import apply_backbone_pretraining
from src.checkpoints import load_into, read_checkpoint
from src.data.problems import DataError
from src.lit import GroundingModule, NonFiniteError
from src.loggers import finish_wandb
from src.params import format_report, parameter_report
from src.report import prediction_grid, print_table, split_metrics, write_results
from src.results import append_result, hydra_choices, in_multirun, reset_peak_memory, result_row, results_file
from src.resume import resume_last_run

log = logging.getLogger(__name__)

# The config entries that decide a model's weights (a checkpoint is evaluated with its own).
WEIGHT_SETTINGS = ("model", "peft", "seed", "pretraining_corpus", "vision_pretraining", "text_pretraining")


def build_module(cfg: DictConfig) -> GroundingModule:
    """The LightningModule for `cfg`: the grounder with its PEFT method, loss and optimiser settings."""
    model = instantiate(cfg.model, _partial_=True)(peft=instantiate(cfg.peft))
    optim = cfg.optim
    return GroundingModule(
        model,
        optimizer=instantiate(optim.optimizer),
        scheduler=instantiate(optim.scheduler) if optim.get("scheduler") else None,
        scheduler_interval=optim.get("scheduler_interval", "epoch"),
        group_lr=dict(optim.get("group_lr") or {}),
        loss=instantiate(cfg.loss) if cfg.get("loss") else None,
        config=resolved(cfg),
        eval_fp32=bool(cfg.get("eval_fp32", False)),
    )


def build_seeded_module(cfg: DictConfig) -> GroundingModule:
    """`build_module` right after seeding: the initial weights (and the data order drawn after them)
    then do not depend on whether the pretraining stages ran or were read from the cache."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return build_module(cfg)


def resolved(cfg: DictConfig) -> dict:
    """The run config as plain data (what checkpoints and results carry). Outside a Hydra run (tests,
    notebooks) an entry whose interpolation cannot resolve (e.g. `${hydra:...}`) is kept unresolved."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    out = {}
    for key in raw:
        try:
            node = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=True)
            out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except InterpolationResolutionError:
            out[key] = raw[key]
    return out


def adopt_checkpoint_model(cfg: DictConfig, stored: dict) -> None:
    """Evaluate a checkpoint as what it was trained as: the settings that decide its weights (model,
    PEFT method, seed, backbone pretraining stages) replace the command line's, since frozen backbones
    are rebuilt from them; data, trainer and logging stay as configured (test it on another benchmark)."""
    if not stored:
        log.warning("the checkpoint carries no config: evaluating it with the model configured here")
        return
    with open_dict(cfg):
        for key in WEIGHT_SETTINGS:
            if key in stored:
                cfg[key] = stored[key]
    log.info("model, peft and seed taken from the checkpoint (%s)", cfg.peft.get("_target_"))


# Precisions that cast the weights themselves: the box head, loss and metric are fp32 by design.
REFUSED_PRECISIONS = ("bf16-true", "16-true", "bf16", "16", "half")


def trainer_settings(cfg: DictConfig) -> dict:
    """Trainer overrides the model decides: official mode under DDP allows unused parameters.

    The official model keeps a dead DyPA projection (trainable, never used, counted by the paper), and
    plain `ddp` stops at the first backward on a parameter without a gradient; every other method uses
    all its trainable parameters (tests/test_distributed.py), so plain `ddp` keeps its cheaper path.
    """
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision in REFUSED_PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision} is not supported: it casts every weight, but the box head, "
            "loss and metrics run in fp32. Use bf16-mixed (or 16-mixed) instead."
        )
    if cfg.model.get("frozen_bf16") and cfg.get("eval_fp32"):
        raise ValueError("model.frozen_bf16=true keeps the frozen backbones in bf16, so they cannot evaluate in fp32: "
                         "set eval_fp32=false or model.frozen_bf16=false")
    if cfg.trainer.get("strategy") == "ddp" and cfg.model.get("mode") == "official":
        log.info("official mode under DDP: strategy ddp_find_unused_parameters_true (the dead DyPA projection)")
        return {"strategy": "ddp_find_unused_parameters_true"}
    return {}


def build_trainer(cfg: DictConfig) -> L.Trainer:
    """The Lightning Trainer with the configured callbacks and loggers."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **trainer_settings(cfg))


def evaluate_splits(trainer: L.Trainer, module: GroundingModule, loaders: list, names: list[str], ckpt: str | None):
    """Run the test loop over `loaders` named `names`; returns per-split acc50/miou/n."""
    module.set_test_splits(names)
    trainer.test(module, dataloaders=loaders, ckpt_path=ckpt, verbose=False, weights_only=True)
    return split_metrics(trainer.callback_metrics, names)


@torch.no_grad()
def draw_predictions(module: GroundingModule, loader, count: int, path: Path) -> None:
    """Save a grid of the first `count` test samples with ground-truth and predicted boxes."""
    module.eval()
    images, gts, preds, phrases = [], [], [], []
    for batch in loader:
        if "image" not in batch:  # every sample skipped (data.bad_records=skip)
            continue
        batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        preds.append(module(batch).boxes.cpu())
        images.append(batch["image"].cpu())
        gts.append(batch["box"].cpu())
        phrases.extend(batch["phrase"])
        if len(phrases) >= count:
            break
    if not images:
        return
    grid = prediction_grid(torch.cat(images)[:count], torch.cat(gts)[:count], torch.cat(preds)[:count], phrases[:count])
    grid.save(path)


def run(cfg: DictConfig) -> float | None:
    """Train, test and report as configured; returns the best val/acc50 (None when not training)."""
    try:
        return train_and_test(cfg)
    finally:
        finish_wandb()


def train_and_test(cfg: DictConfig) -> float | None:
    """The body of `run`: everything but closing the W&B run."""
    start = time.perf_counter()
    reset_peak_memory()
    if cfg.get("ckpt_path") == "last":  # continue that run, in its own folder (best-checkpoint tracking included)
        resume_last_run(cfg, resolved(cfg))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluate_only = bool(cfg.get("ckpt_path")) and not cfg.train
    if evaluate_only:  # the checkpoint decides the model; its frozen backbones are rebuilt below
        stored_state, stored_config, stored_prints = read_checkpoint(cfg.ckpt_path)
        adopt_checkpoint_model(cfg, stored_config)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    apply_backbone_pretraining(cfg, datamodule)
    module = build_seeded_module(cfg)
    if evaluate_only:
        load_into(module.model, stored_state, stored_prints, str(cfg.ckpt_path))
    params = parameter_report(module.model)
    log.info(format_report(params))
    trainer = build_trainer(cfg)
    for logger in trainer.loggers:  # W&B: the run's config panel; CSV: hparams.yaml
        logger.log_hyperparams({"config": resolved(cfg), "parameters": params})

    best_ckpt, best_score = None, None
    if cfg.train:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
        except (NonFiniteError, DataError) as err:
            return record_failure(cfg, trainer, params, err, time.perf_counter() - start)
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
            best_ckpt = checkpoint.best_model_path
            best_score = float(checkpoint.best_model_score)
        elif "val/acc50" in trainer.callback_metrics:
            best_score = float(trainer.callback_metrics["val/acc50"])

    splits, shuffled = {}, {}
    if cfg.test:
        datamodule.trainer = trainer  # its loaders then split the samples exactly over the processes
        datamodule.setup("test")
        names = list(datamodule.test_split_names)
        splits = evaluate_splits(trainer, module, datamodule.test_dataloader(), names, best_ckpt)
        if cfg.shuffled_text_check:
            loaders = [datamodule.shuffled_text_dataloader(n) for n in names]
            scores = evaluate_splits(trainer, module, loaders, [f"{n}_shuffled_text" for n in names], None)
            shuffled = {n: {"acc50": scores[f"{n}_shuffled_text"]["acc50"]} for n in names}
    problems = data_problems(datamodule, module)  # gathers over processes: every rank takes part
    if not trainer.is_global_zero:
        return best_score
    if cfg.test:
        if cfg.visualize:
            draw_predictions(module, datamodule.test_dataloader()[0], int(cfg.visualize), out_dir / "predictions.png")
        print_table(splits, shuffled)
    config = resolved(cfg)
    wall = round(time.perf_counter() - start, 2)
    write_results(out_dir / "results.json", {
        "status": "ok",
        "splits": splits,
        "shuffled_text": shuffled,
        "wall_seconds": wall,
        "best_val_acc50": best_score,
        "best_checkpoint": best_ckpt,
        "data_problems": problems,
        "quirks": module.model.quirks.as_dict(),
        "parameters": params,
        "config": config,
    })
    row = result_row(
        config, choices=hydra_choices(), params=params, splits=splits, shuffled=shuffled, best_val=best_score,
        checkpoint=best_ckpt or cfg.get("ckpt_path"), wall_seconds=wall, output_dir=out_dir,
    )
    table = append_result(results_file(out_dir), row)
    log.info("results written to %s (and a line in %s)", out_dir / "results.json", table)
    return best_score


def data_problems(datamodule: L.LightningDataModule, module: GroundingModule) -> dict:
    """Records left out: at reading (degenerate boxes, per split) and skipped when loading (per stage)."""
    dropped = datamodule.reading_problems() if hasattr(datamodule, "reading_problems") else {}
    skipped = module.skipped.summary()
    for stage, found in skipped.items():
        log.warning("%s: %d records skipped (data.bad_records=skip): %s", stage, found["count"], found["kinds"])
    return {"dropped_at_reading": dropped, "skipped": skipped}


def record_failure(cfg: DictConfig, trainer: L.Trainer, params: dict, err: Exception, seconds: float) -> float:
    """Write results.json and the results line with `status: failed` and the reason; a single run then
    stops with the error, a sweep goes on (its sweeper sees NaN: Optuna marks the trial failed)."""
    out_dir = Path(cfg.paths.output_dir)
    checkpoint = trainer.checkpoint_callback
    kept = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else None
    log.error("run failed: %s (last good checkpoint: %s)", err, kept or "none")
    if trainer.is_global_zero:
        config = resolved(cfg)
        write_results(out_dir / "results.json", {
            "status": "failed", "reason": str(err), "wall_seconds": round(seconds, 2), "best_checkpoint": kept or None,
            "parameters": params, "config": config,
        })
        row = result_row(config, choices=hydra_choices(), params=params, splits={}, shuffled={}, best_val=None,
                         checkpoint=kept or None, wall_seconds=round(seconds, 2), output_dir=out_dir)
        append_result(results_file(out_dir), row | {"status": "failed", "reason": str(err)})
    if in_multirun():
        return float("nan")
    raise err


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point."""
    return run(cfg)


if __name__ == "__main__":
    main()
