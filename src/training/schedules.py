"""Learning-rate schedules that need the run's total number of optimiser steps."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, floor: float = 0.0) -> LambdaLR:
    """Linear warm-up for `warmup_steps`, then cosine decay to `floor` x the base LR at `total_steps`.

    One closed-form factor rather than SequentialLR(LinearLR, CosineAnnealingLR): the floor is relative to each
    optimiser group's own LR (CosineAnnealingLR's `eta_min` is one absolute LR for every group, and the groups
    train at different LRs), and the value at a step does not depend on a chain of earlier steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(optimizer: Optimizer, lr: float, steps: int) -> OneCycleLR:
    """One cycle over `steps` steps with a 10 % warm-up, except where that warm-up is exactly one step (10
    steps): OneCycleLR then divides by zero, so the warm-up takes two."""
    pct = 2 / steps if math.isclose(0.1 * steps, 1.0) else 0.1
    return OneCycleLR(optimizer, lr, total_steps=steps, pct_start=pct)
