"""Logger factories used by the Hydra configs."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_mode() -> str:
    """`WANDB_MODE` if set; otherwise online when W&B credentials exist, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"
    return "online" if rc.authenticators("api.wandb.ai") else "offline"


def wandb_logger(save_dir: str, **kwargs: Any) -> WandbLogger:
    """A W&B logger writing under the run folder, online only when W&B is configured."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(save_dir=save_dir, mode=wandb_mode(), **kwargs)


def finish_wandb() -> None:
    """Close the process's W&B run, if any: its files are complete on disk, and the next run of a sweep
    in the same process gets a run of its own (Lightning's WandbLogger would otherwise reuse this one)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
