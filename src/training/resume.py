"""`ckpt_path=last`: find the newest `last.ckpt` of an earlier run with the same settings and continue that run in
its own folder; refuse to continue it on another number of processes."""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from src.errors import ConfigError, UserError
from src.storage.checkpoints import load_checkpoint_file

log = logging.getLogger(__name__)

# The settings that make two runs "the same run" (trainer, logging and paths may differ, e.g. to train
# longer or on another machine).
RESUME_KEYS = ("task_name", "model", "peft", "data", "optim", "loss", "seed", "pretraining_corpus",
               "vision_pretraining", "text_pretraining")


def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved run config that must match; backbone init files are derived, so left out."""
    out = {k: config.get(k) for k in RESUME_KEYS}
    model = dict(out["model"] or {})
    for part in ("vision", "text", "prior"):
        if isinstance(model.get(part), Mapping):
            model[part] = {k: v for k, v in model[part].items() if k != "init_checkpoint"}
    out["model"] = model
    return out


def find_last_checkpoint(config: Mapping[str, Any], roots: Iterable[str | Path]) -> Path:
    """The most recently written `last.ckpt` under `roots` whose run had these settings."""
    candidates = [p for root in map(Path, roots) if root.is_dir() for p in root.rglob("last.ckpt")]
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    wanted = comparable(config)
    for path in candidates:
        try:
            stored = load_checkpoint_file(path).get("config") or {}
        except UserError as err:  # a partial, corrupt or unsafe file is no run to resume: say so, look further
            log.warning("ckpt_path=last: skipping %s", err)
            continue
        if comparable(stored) == wanted:
            return path
    raise ConfigError(
        f"ckpt_path=last: none of the {len(candidates)} last.ckpt files under {[str(r) for r in roots]} comes from "
        "a run with these settings (task_name, model, peft, data, optim, loss, seed, pretraining)"
    )


def resume_last_run(cfg: DictConfig, config: Mapping[str, Any]) -> None:
    """`ckpt_path=last`: point `cfg` (resolved as `config`) at the newest `last.ckpt` of a run with the same settings
    and continue in that run's folder; what Hydra wrote for this invocation moves there (no stray run folder)."""
    last = find_last_checkpoint(config, cfg.get("resume_roots") or ["outputs"])
    with open_dict(cfg):
        cfg.ckpt_path, cfg.paths.output_dir = str(last), str(last.parent.parent)
    log.info("resuming from %s; the run continues in %s", cfg.ckpt_path, cfg.paths.output_dir)
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        move_invocation(Path(hydra.runtime.output_dir), hydra.output_subdir, Path(cfg.paths.output_dir))


def move_invocation(folder: Path, config_subdir: str | None, run_dir: Path) -> None:
    """Move this invocation's log files and Hydra config folder from `folder` (Hydra's run folder for it) to
    `<run_dir>/resumes/<folder name>/`, and remove `folder` if nothing else is left in it.

    The log files keep being written at their new place. Only what Hydra wrote is moved: `hydra.run.dir` may
    name a folder that holds other things. DDP processes of the same invocation add their own logs to the same
    sub-folder; another invocation whose folder had the same name gets `<folder name>-<n>`.
    """
    if folder.resolve() == run_dir.resolve():
        return
    logs = [h for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == folder.resolve()]
    names = [Path(h.baseFilename).name for h in logs]
    if config_subdir and (folder / config_subdir).is_dir():
        names.append(config_subdir)
    resumes = run_dir / "resumes"
    places = (resumes / (folder.name if n == 0 else f"{folder.name}-{n}") for n in itertools.count())
    target = next(place for place in places if not any((place / name).exists() for name in names))
    target.mkdir(parents=True, exist_ok=True)
    for handler in logs:
        with handler.lock:
            handler.close()  # reopened at the new place by its next record
            moved = target / Path(handler.baseFilename).name
            shutil.move(handler.baseFilename, moved)
            handler.baseFilename, handler.mode = str(moved.resolve()), "a"
    if config_subdir in names:
        shutil.move(folder / config_subdir, target / config_subdir)
    with contextlib.suppress(OSError):  # not empty (other files, or a DDP process's log not moved yet) or gone
        folder.rmdir()


def check_processes(saved: int | None, now: int) -> None:
    """Refuse to continue training on another number of processes than the checkpoint's run had."""
    if saved is not None and saved != now:
        raise ConfigError(
            f"the checkpoint was saved by a run on {saved} processes (trainer.devices x trainer.num_nodes) and this "
            f"run has {now}: its data order, per-process batches and learning-rate schedule would not continue as "
            f"they were. Resume it on {saved} processes, or evaluate it on any number (train=false ckpt_path=<file>)."
        )
