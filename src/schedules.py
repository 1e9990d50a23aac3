"""Learning-rate schedules that need the run's total number of optimiser steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from src.errors import ConfigError


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> LambdaLR:
    """Linear warm-up for `warmup_steps`, then cosine decay to `floor` x the base LR at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: Optimizer, lr: float, steps: int, what: str) -> OneCycleLR:
    """One cycle over `steps` steps with a warm-up of a tenth of them, and at least 2 (OneCycleLR divides by
    zero when its warm-up is exactly one step, e.g. 10 steps at 10 %); `what` names the setting in errors."""
    if steps < 3:
        raise ConfigError(f"{what}={steps}: a pretraining stage needs at least 3 steps")
    warmup = max(2, round(0.1 * steps))
    return OneCycleLR(optimizer, lr, total_steps=steps, pct_start=warmup / steps)
