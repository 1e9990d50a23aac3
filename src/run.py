"""The suite's entry point: `python -m src.run [overrides]`.

Trains the configured model on the configured benchmark, keeps the best checkpoint by `val/acc50`,
tests it on every test split (keys `test/<split>/acc50`), optionally measures accuracy with the
expressions shuffled across samples, and writes results.json, predictions.png, CSV/W&B logs and the
checkpoint under the run folder. Returns `optimized_metric` (the best `val/acc50` by default) for Hydra sweepers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from src.analysis.samples import SAMPLES_FILE, SplitSamples, hit_record, write_samples
from src.analysis.table import (
    append_result,
    hydra_choices,
    in_multirun,
    reset_peak_memory,
    result_row,
    results_file,
    weights_digest,
)
from src.config import import_plugins
from src.errors import ConfigError, as_user_error, reported_errors
from src.models.peft.registry import current_form
from src.params import format_report, parameter_report
from src.pretraining.stages import apply_backbone_pretraining
from src.storage.checkpoints import StoredCheckpoint, load_checkpoint_file, load_into, read_stored
from src.storage.trust import check_stored_config
from src.training.lit import GroundingModule, OverflowGuard
from src.training.loggers import finish_wandb
from src.training.report import prediction_grid, print_table, split_metrics, write_results
from src.training.resume import resume_last_run

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
        full_backbone_lr=optim.get("full_backbone_lr"),
        loss=instantiate(cfg.loss) if cfg.get("loss") else None,
        config=resolved(cfg),
        eval_fp32=bool(cfg.get("eval_fp32", False)),
        choices=hydra_choices(),
        overflow_guard=OverflowGuard(**(cfg.get("overflow_guard") or {})),
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


def adopt_checkpoint_model(cfg: DictConfig, stored: dict, source: str, choices: dict[str, str] | None = None) -> None:
    """Evaluate a checkpoint as what it was trained as: the settings that decide its weights (model,
    PEFT method, seed, backbone pretraining stages) replace the command line's, since frozen backbones
    are rebuilt from them; data, trainer and logging stay as configured (test it on another benchmark).
    A method config written before the method registry gets today's form, named by the `peft=` choice
    the checkpoint records (`choices`).

    The stored settings are data: they may only name the suite's own classes and registered methods (or
    those configured here) and hold plain values (`src.storage.trust`); anything else is refused before it
    is used."""
    if not stored:
        log.warning("the checkpoint carries no config: evaluating it with the model configured here")
        return
    check_stored_config(stored, WEIGHT_SETTINGS, cfg, source)
    with open_dict(cfg):
        for key in WEIGHT_SETTINGS:
            if key in stored:
                cfg[key] = current_form(stored[key], (choices or {}).get("peft")) if key == "peft" else stored[key]
    log.info("model, peft and seed taken from the checkpoint (peft=%s)", cfg.peft.get("name"))


# Precisions that cast the weights themselves: the box head, loss and metric are fp32 by design.
REFUSED_PRECISIONS = ("bf16-true", "16-true", "bf16", "16", "half")


def trainer_settings(cfg: DictConfig, module: GroundingModule | None = None) -> dict:
    """Trainer overrides the model decides: a model with trainable parameters that no forward uses (the
    official DyPA's dead projection: official mode, or clean mode with `dypa_official_init`) makes every
    DDP-like strategy look for unused parameters; every other model keeps plain DDP's cheaper path
    (all its trainable parameters get gradients: tests/test_distributed.py)."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision in REFUSED_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision} is not supported: it casts every weight, but the box head, "
            "loss and metrics run in fp32. Use bf16-mixed (or 16-mixed) instead."
        )
    if cfg.model.get("frozen_bf16") and cfg.get("eval_fp32"):
        raise ConfigError("model.frozen_bf16=true keeps the frozen backbones in bf16, so they cannot evaluate in fp32: "
                         "set eval_fp32=false or model.frozen_bf16=false")
    unused = module.model.unused_trainable_parameters() if module is not None else []
    strategy = ddp_with_unused_parameters(cfg.trainer) if unused else None
    if strategy is None:
        return {}
    log.info("%d trainable parameters are never used in forward (first: %s): strategy %s", len(unused), unused[0],
             strategy)
    return {"strategy": strategy}


# DDP-like strategies by name -> the same strategy looking for unused parameters.
FIND_UNUSED = {name: f"{name}_find_unused_parameters_true" for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")}


def ddp_with_unused_parameters(trainer: DictConfig) -> str | None:
    """The configured strategy's variant that finds unused parameters, when it runs several processes
    (`auto` picks DDP for several devices); None when no DDP runs or the strategy is not one by name."""
    strategy = trainer.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy.endswith("_find_unused_parameters_true"):
        return None
    if strategy in FIND_UNUSED:
        return FIND_UNUSED[strategy]
    if strategy == "auto" and process_count(trainer) > 1:
        return FIND_UNUSED["ddp"]
    return None


def process_count(trainer: DictConfig) -> int:
    """How many processes the trainer settings start: devices per node (a count, a list, `-1`/`auto` for
    every visible GPU; one process on CPU) times `num_nodes`."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and "," in devices:
        per_node = len([d for d in devices.split(",") if d.strip()])
    elif OmegaConf.is_list(devices) or isinstance(devices, list | tuple):
        per_node = len(devices)
    elif str(devices) in ("-1", "auto"):
        per_node = torch.cuda.device_count() if trainer.get("accelerator") != "cpu" else 1
    else:
        per_node = int(devices)
    return max(per_node, 1) * int(trainer.get("num_nodes", 1) or 1)


def build_trainer(cfg: DictConfig, module: GroundingModule | None = None) -> L.Trainer:
    """The Lightning Trainer with the configured callbacks and loggers, and the settings `module` needs."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **trainer_settings(cfg, module))


def best_model_score(checkpoint: ModelCheckpoint) -> float | None:
    """The best checkpoint's monitored score; under `ddp_spawn` only its path comes back to the launching
    process, so the score is read from the checkpoint's own record of its callback state."""
    if checkpoint.best_model_score is not None:
        return float(checkpoint.best_model_score)
    states = load_checkpoint_file(checkpoint.best_model_path).get("callbacks") or {}
    scores = [s.get("best_model_score") for s in states.values() if isinstance(s, dict) and "best_model_score" in s]
    return float(scores[0]) if scores and scores[0] is not None else None


def evaluate_splits(trainer: L.Trainer, module: GroundingModule, loaders: list, names: list[str], ckpt: str | None):
    """Run the test loop over `loaders` named `names`; returns per-split acc50/miou/n."""
    module.set_test_splits(names)
    trainer.test(module, dataloaders=loaders, ckpt_path=ckpt, verbose=False, weights_only=True)
    return split_metrics(trainer.callback_metrics, names)


def split_samples(module: GroundingModule, loaders: list, names: list[str], splits: dict) -> dict[str, SplitSamples]:
    """The test loop's per-sample outcomes of each split whose record holds every sample its metric counted
    (none under `ddp_spawn`, whose test loop runs in other processes: the comparison then uses per-run figures)."""
    out = {}
    for name, loader in zip(names, loaders, strict=True):
        index, iou = module.test_samples.get(name, ((), ()))
        if len(index) and len(index) == splits[name]["n"]:
            out[name] = SplitSamples(len(loader.dataset), index, iou)
        else:
            log.warning("%s: no per-sample record of the test (%d of %d samples recorded)", name, len(index),
                        splits[name]["n"])
    return out


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


@dataclass
class RunProgress:
    """What a run has built so far, for the record of a run that fails part way."""

    params: dict | None = None
    trainer: L.Trainer | None = None


def run(cfg: DictConfig) -> float | None:
    """Train, test and report as configured; returns `optimized_metric` (None when nothing was logged).

    A failure the user can act on (`src.errors.UserError`: bad data, checkpoint or setting, a non-finite
    loss) is recorded in results.json and the results line with `status: failed`; a single run then
    raises it, a sweep job returns NaN so that the sweep goes on (Optuna marks the trial failed).
    """
    start, progress = time.perf_counter(), RunProgress()
    try:
        return train_and_test(cfg, progress)
    except Exception as err:
        failure = as_user_error(err)
        if failure is None:
            raise
        record_failure(cfg, progress, failure, time.perf_counter() - start)
        if in_multirun():
            return float("nan")
        raise
    finally:
        finish_wandb()


def train_and_test(cfg: DictConfig, progress: RunProgress) -> float | None:
    """The body of `run` as named steps: everything but failure handling and closing the W&B run."""
    start = time.perf_counter()
    reset_peak_memory()
    evaluated = prepare(cfg)
    datamodule, module = build_parts(cfg, evaluated, progress)
    trainer = progress.trainer = build_trainer(cfg, module)
    for logger in trainer.loggers:  # W&B: the run's config panel; CSV: hparams.yaml
        logger.log_hyperparams({"config": resolved(cfg), "parameters": progress.params})
    fitted = fit(cfg, trainer, module, datamodule)
    tested = run_test_loops(cfg, trainer, module, datamodule, fitted.best_checkpoint)
    problems = data_problems(datamodule, module)  # gathers over processes: every rank takes part
    value = optimized_value(cfg, trainer, fitted.best_score, fitted.logged | tested.logged)
    if trainer.is_global_zero:
        if cfg.test:
            show_test(cfg, module, datamodule, tested)
        report(cfg, trainer, module, progress.params, evaluated, fitted, tested, problems,
               round(time.perf_counter() - start, 2))
    return value


def prepare(cfg: DictConfig) -> StoredCheckpoint | None:
    """Settle where the run goes and what it is: `ckpt_path=last` continues that run in its own folder; an
    evaluation (`train=false ckpt_path=...`) takes its model from the checkpoint, which it returns."""
    if cfg.get("ckpt_path") == "last":
        resume_last_run(cfg, resolved(cfg))
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    if not cfg.get("ckpt_path") or cfg.train:
        return None
    stored = read_stored(cfg.ckpt_path)
    adopt_checkpoint_model(cfg, stored.config, str(cfg.ckpt_path), stored.choices)
    return stored


def build_parts(
    cfg: DictConfig, evaluated: StoredCheckpoint | None, progress: RunProgress
) -> tuple[L.LightningDataModule, GroundingModule]:
    """The data, the backbones' pretraining stages (cached) and the seeded model, with an evaluated
    checkpoint's weights; records the parameter report in `progress`."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    apply_backbone_pretraining(cfg, datamodule)
    module = build_seeded_module(cfg)
    if evaluated is not None:
        load_into(module.model, evaluated.state, evaluated.fingerprint, str(cfg.ckpt_path))
    progress.params = parameter_report(module.model)
    log.info(format_report(progress.params))
    return datamodule, module


@dataclass
class Fitted:
    """What training left: the best checkpoint, its monitored score and the metrics last logged."""

    best_checkpoint: str | None = None
    best_score: float | None = None
    logged: dict[str, float] = field(default_factory=dict)


def fit(cfg: DictConfig, trainer: L.Trainer, module: GroundingModule, datamodule: L.LightningDataModule) -> Fitted:
    """Train (or continue from `ckpt_path`) when `train` is on, keeping the best checkpoint by its monitor."""
    if not cfg.train:
        return Fitted()
    if cfg.get("ckpt_path"):  # an unsafe or unreadable file gets the suite's message, not Lightning's
        load_checkpoint_file(cfg.ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fitted = Fitted(logged=logged_metrics(trainer))
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
        fitted.best_checkpoint = checkpoint.best_model_path
        fitted.best_score = best_model_score(checkpoint)
    elif "val/acc50" in fitted.logged:
        fitted.best_score = fitted.logged["val/acc50"]
    return fitted


@dataclass
class Tested:
    """What testing measured: per-split metrics, the shuffled-text control, per-sample outcomes, logged keys."""

    splits: dict = field(default_factory=dict)
    shuffled: dict = field(default_factory=dict)
    samples: dict[str, SplitSamples] = field(default_factory=dict)
    logged: dict[str, float] = field(default_factory=dict)


def run_test_loops(
    cfg: DictConfig, trainer: L.Trainer, module: GroundingModule, datamodule: L.LightningDataModule,
    best_checkpoint: str | None,
) -> Tested:
    """Test the best checkpoint (else the current weights) on every test split, then with the expressions
    shuffled across samples when `shuffled_text_check` is on."""
    if not cfg.test:
        return Tested()
    datamodule.trainer = trainer  # its loaders then split the samples exactly over the processes
    datamodule.setup("test")
    names = list(datamodule.test_split_names)
    loaders = datamodule.test_dataloader()
    splits = evaluate_splits(trainer, module, loaders, names, best_checkpoint)
    tested = Tested(splits=splits, samples=split_samples(module, loaders, names, splits),
                    logged=logged_metrics(trainer))
    if cfg.shuffled_text_check:
        loaders = [datamodule.shuffled_text_dataloader(n) for n in names]
        scores = evaluate_splits(trainer, module, loaders, [f"{n}_shuffled_text" for n in names], None)
        tested.shuffled = {n: {"acc50": scores[f"{n}_shuffled_text"]["acc50"]} for n in names}
    return tested


def show_test(cfg: DictConfig, module: GroundingModule, datamodule: L.LightningDataModule, tested: Tested) -> None:
    """The test table on the console and, with `visualize`, predictions.png of the first test samples."""
    if cfg.visualize:
        draw_predictions(module, datamodule.test_dataloader()[0], int(cfg.visualize),
                         Path(cfg.paths.output_dir) / "predictions.png")
    print_table(tested.splits, tested.shuffled)


def report(
    cfg: DictConfig, trainer: L.Trainer, module: GroundingModule, params: dict, evaluated: StoredCheckpoint | None,
    fitted: Fitted, tested: Tested, problems: dict, wall: float,
) -> None:
    """results.json, the per-sample record and the run's line in the results table."""
    out_dir, config = Path(cfg.paths.output_dir), resolved(cfg)
    write_results(out_dir / "results.json", {
        "status": "ok",
        "splits": tested.splits,
        "shuffled_text": tested.shuffled,
        "wall_seconds": wall,
        "best_val_acc50": fitted.best_score,
        "best_checkpoint": fitted.best_checkpoint,
        "data_problems": problems,
        "quirks": module.model.quirks.as_dict(),
        "parameters": params,
        "config": config,
    })
    if tested.samples:
        write_samples(out_dir / SAMPLES_FILE, tested.samples)
    checkpoint = {"checkpoint_config": evaluated.config, "weights": weights_digest(evaluated.state)} if evaluated \
        else {}
    row = result_row(
        config, choices=run_choices(cfg, evaluated.choices if evaluated else None), params=params,
        splits=tested.splits, shuffled=tested.shuffled, best_val=fitted.best_score,
        checkpoint=fitted.best_checkpoint or cfg.get("ckpt_path"), wall_seconds=wall, output_dir=out_dir,
        processes=trainer.world_size, sample_hits={n: hit_record(s) for n, s in tested.samples.items()}, **checkpoint,
    )
    table = append_result(results_file(out_dir), row)
    log.info("results written to %s (and a line in %s)", out_dir / "results.json", table)


def logged_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The scalar metrics the last loop logged (Lightning keeps only the latest loop's)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if not torch.is_tensor(v) or v.numel() == 1}


def optimized_value(cfg: DictConfig, trainer: L.Trainer, best_score: float | None, logged: dict[str, float]):
    """What a Hydra sweeper optimises: `optimized_metric` at the best checkpoint when that checkpoint is chosen
    by it (val/acc50 by default), else its value as training or the first test loop last logged it (e.g.
    `val/miou`, `test/test/acc50`); None when its loop did not run (e.g. `val/` metrics in an evaluation)."""
    name = str(cfg.get("optimized_metric") or "val/acc50")
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor == name and best_score is not None:
        return best_score
    if name in logged:
        return logged[name]
    loop = name.split("/", 1)[0] + "/"
    if not any(key.startswith(loop) for key in logged):  # that loop did not run (e.g. val/ in an evaluation)
        return None
    raise ConfigError(f"optimized_metric={name} was not logged by this run; it logged {', '.join(sorted(logged))}")


def run_choices(cfg: DictConfig, checkpoint_choices: dict[str, str] | None = None) -> dict[str, str]:
    """The config-group choices for the results line: an evaluation's model and method are its checkpoint's
    (the ones it records, `checkpoint_choices` when already read; none for files written before they were
    recorded), not the command line's."""
    choices = hydra_choices()
    if cfg.get("ckpt_path") and not cfg.train:
        recorded = checkpoint_choices if checkpoint_choices is not None else read_stored(cfg.ckpt_path).choices
        choices = {k: v for k, v in choices.items() if k not in ("model", "peft")}
        choices |= {k: v for k, v in recorded.items() if k in ("model", "peft")}
    return choices


def data_problems(datamodule: L.LightningDataModule, module: GroundingModule) -> dict:
    """Records left out: at reading (degenerate boxes, per split) and skipped when loading (per stage)."""
    dropped = datamodule.reading_problems() if hasattr(datamodule, "reading_problems") else {}
    skipped = module.skipped.summary()
    for stage, found in skipped.items():
        log.warning("%s: %d records skipped (data.bad_records=skip): %s", stage, found["count"], found["kinds"])
    return {"dropped_at_reading": dropped, "skipped": skipped}


def record_failure(cfg: DictConfig, progress: RunProgress, err: Exception, seconds: float) -> None:
    """Write results.json and the results line with `status: failed`, the reason and the last good checkpoint."""
    trainer = progress.trainer
    checkpoint = trainer.checkpoint_callback if trainer is not None else None
    kept = (checkpoint.best_model_path or None) if isinstance(checkpoint, ModelCheckpoint) else None
    log.error("run failed: %s (last good checkpoint: %s)", err, kept or "none")
    if not (trainer.is_global_zero if trainer is not None else rank_zero_only.rank == 0):
        return
    out_dir, config, params = Path(cfg.paths.output_dir), resolved(cfg), progress.params or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(out_dir / "results.json", {
        "status": "failed", "reason": str(err), "wall_seconds": round(seconds, 2), "best_checkpoint": kept,
        "parameters": params, "config": config,
    })
    row = result_row(config, choices=hydra_choices(), params=params, splits={}, shuffled={}, best_val=None,
                     checkpoint=kept, wall_seconds=round(seconds, 2), output_dir=out_dir,
                     processes=trainer.world_size if trainer is not None else None)
    append_result(results_file(out_dir), row | {"status": "failed", "reason": str(err)})


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: the configured plugins imported, then the run; a UserError ends it with one
    `error: ...` message (HYDRA_FULL_ERROR=1: traceback)."""
    with reported_errors():
        import_plugins(cfg)
        return run(cfg)


if __name__ == "__main__":
    main()
