"""The warm-up + cosine schedule used by the fast recipe."""

from __future__ import annotations

import pytest
import torch

from src.training.schedules import one_cycle, warmup_cosine


def lrs(total: int, **kwargs) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total, **kwargs)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_warmup_then_cosine_to_floor():
    values = lrs(12, warmup_steps=2, floor=0.1)
    assert values[:2] == pytest.approx([0.5, 1.0])
    assert values[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[2:], values[3:], strict=False))
    assert values[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 9 / 10)).item()))


def test_floor_one_is_constant_after_warmup():
    assert lrs(8, warmup_steps=3, floor=1.0)[3:] == pytest.approx([1.0] * 5)


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20, 25, 300])
def test_one_cycle_runs_for_every_step_count(steps: int):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-3)
    schedule = one_cycle(optimizer, 1e-3, steps)  # 10 steps divided by zero in OneCycleLR before
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    if steps != 10:  # every other step count keeps the 10 % warm-up it always had
        assert schedule._schedule_phases[0]["end_step"] == 0.1 * steps - 1
