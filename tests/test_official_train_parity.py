"""Official mode trains the way the official MaPPER code trains: one training step against golden cases.

One test per case file (`$MAPPER_TRAIN_PARITY_CASES`, default ../shared/parity/train_cases; format and
comparison rules in ../shared/parity/README.md §8): the case's official weights converted by the
converter, the model in training mode with every dropout probability 0 (LoCA's BatchNorm in training
mode), the suite's loss at the official 1 : 1 weights, backward, and one step of the optimiser the
`optim=paper` config builds. It checks the boxes, the loss terms, the trainable set, every gradient,
every parameter after the step, LoCA's BatchNorm statistics and that nothing frozen moved.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from src.config import compose
from src.convert_official import convert_official
from src.models.official import convert_state_dict
from src.training.lit import GroundingModule
from src.training.losses import GroundingLoss
from tests.parity_recipe import load_manifest, recipe_inputs, recipe_state_dict
from tests.test_official_parity import PARITY_DIR, _needed, two_threads  # noqa: F401 (fixture)

CASES_DIR = Path(os.environ.get("MAPPER_TRAIN_PARITY_CASES", PARITY_DIR / "train_cases"))
CASE_FILES = sorted(CASES_DIR.glob("*.json")) if CASES_DIR.is_dir() else []


def _case_params() -> list[Any]:
    if CASE_FILES:
        return [pytest.param(path, id=path.name) for path in CASE_FILES]
    return [pytest.param(None, id="no-cases", marks=pytest.mark.skip(reason=f"no training cases in {CASES_DIR}"))]


def suite_key(official_key: str, shape: list[int]) -> str:
    """The suite tensor an official tensor becomes (one-to-one and same shape for every trained tensor)."""
    state = convert_state_dict({official_key: torch.zeros(shape)}).state
    assert len(state) == 1, f"{official_key} maps to {sorted(state)}"
    [(key, value)] = state.items()
    assert list(value.shape) == shape, f"{official_key} -> {key} changes shape"
    return key


def zero_dropout(model: nn.Module) -> None:
    """Every dropout probability to 0: Dropout modules and the float rates attention modules read."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("dropout", "attention_dropout", "dropout_p"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)


def summary_check(got: torch.Tensor, expected: dict[str, Any], scale: float, extra: float = 0.0,
                  noise: tuple[int, int] | None = None, lr: float = 0.0) -> list[str]:
    """§8.4's summary rule (values, mean_abs, sum) with allowance `scale` (+ 2 lr per noise element)."""
    t = got.detach().double().flatten()
    a, b = noise or (0, 0)
    problems = []
    for i, e in enumerate(expected["values"]):
        allowed = scale + (2 * lr if a <= i < b else 0.0)
        if abs(t[i].item() - e) > allowed:
            problems.append(f"value {i}: {t[i].item():.9g} vs {e:.9g} (allowed {allowed:.2e})")
    if abs(t.abs().mean().item() - expected["mean_abs"]) > scale + extra * (b - a) / t.numel():
        problems.append(f"mean_abs {t.abs().mean().item():.9g} vs {expected['mean_abs']:.9g}")
    if abs(t.sum().item() - expected["sum"]) > scale * t.numel() + extra * (b - a):
        problems.append(f"sum {t.sum().item():.9g} vs {expected['sum']:.9g}")
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("case_file", _case_params())
def test_official_mode_training_step_matches_official_code(case_file: Path, shared_dir: Path,
                                                           two_threads: None) -> None:  # noqa: F811
    case = json.loads(case_file.read_text())
    manifest_path = PARITY_DIR / case["weights"]["manifest"]
    if not manifest_path.is_file():
        pytest.skip(f"parity manifest {manifest_path} is absent")
    official = recipe_state_dict(load_manifest(manifest_path), case["weights"], keep=_needed)
    inputs, expected, tol = case["inputs"], case["expected"], case["expected"]["tolerances"]
    model, _, _ = convert_official(official, max_query_len=int(inputs["max_query_len"]),
                                   image_size=int(inputs["image_size"]))
    del official
    optim = compose(["optim=paper"]).optim
    module = GroundingModule(model, optimizer=instantiate(optim.optimizer), group_lr=dict(optim.group_lr),
                             loss=GroundingLoss(1.0, 1.0))
    optimizer, _ = module.build_optimizer(total_steps=1)

    names = {suite_key(k, e["shape"]): k for k, e in expected["grads"].items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unused = {n for n, k in names.items() if expected["grads"][k]["norm"] is None}
    assert trainable == set(names), (sorted(trainable - set(names))[:5], sorted(set(names) - trainable)[:5])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    model.train()
    zero_dropout(model)
    pred = model(**recipe_inputs(inputs)).boxes
    losses = module.loss(pred, torch.tensor(case["train"]["targets"], dtype=torch.float32))
    losses["loss"].backward()

    box_error = (pred.detach().double() - torch.tensor(expected["pred_boxes"], dtype=torch.float64)).abs().max()
    assert box_error <= tol["pred_boxes_atol"], f"train-mode boxes off by {box_error:.3e}"
    for ours, theirs in (("l1", "loss_bbox"), ("giou", "loss_giou")):
        assert abs(losses[ours].item() - expected["loss"][theirs]) <= tol["loss_atol"], (ours, losses[ours].item())

    params = dict(model.named_parameters())
    noise = expected["noise_elements"]
    failures: dict[str, list[str]] = {}
    for name, key in names.items():
        e, grad = expected["grads"][key], params[name].grad
        if e["norm"] is None:
            assert grad is None, f"{name} ({key}) got a gradient; the official one has none"
            continue
        assert grad is not None, f"{name} ({key}) got no gradient"
        a, b = noise.get(key, {}).get("range", (0, 0))
        if (a, b) == (0, grad.numel()):  # mathematically zero as a whole: rounding noise only
            if grad.double().norm().item() > tol["grad_noise_atol"]:
                failures[name] = [f"noise gradient norm {grad.double().norm().item():.2e}"]
            continue
        n, r = e["norm"], tol["grad_rtol"]
        g = grad.double().flatten()
        problems = [f"value {i}: {g[i].item():.6g} vs {v:.6g}" for i, v in enumerate(e["values"])
                    if abs(g[i].item() - v) > r * n]
        if abs(g.norm().item() - n) > r * n:
            problems.append(f"norm {g.norm().item():.6g} vs {n:.6g}")
        if abs(g.sum().item() - e["sum"]) > r * n * math.sqrt(g.numel()):
            problems.append(f"sum {g.sum().item():.6g} vs {e['sum']:.6g}")
        if problems:
            failures[name] = problems
    assert not failures, f"{len(failures)} gradients differ; first: {dict(list(failures.items())[:3])}"

    optimizer.step()
    for name, key in names.items():
        e = expected["after_step"]["params"][key]
        if name in unused:  # no gradient: AdamW skips it (no update, no weight decay)
            continue
        a, b = noise.get(key, {}).get("range", (0, 0))
        problems = summary_check(params[name], e, tol["param_rtol"] * e["mean_abs"], extra=2 * e["lr"],
                                 noise=(a, b), lr=e["lr"])
        if problems:
            failures[name] = problems
    assert not failures, f"{len(failures)} parameters differ after the step; first: {dict(list(failures.items())[:3])}"

    buffers = dict(model.named_buffers())
    for key, e in expected["after_step"]["buffers"].items():
        name = suite_key(key, e["shape"]) if isinstance(e, dict) else suite_key(key, [])
        if key.endswith("num_batches_tracked"):
            assert int(buffers[name]) == int(e if not isinstance(e, dict) else e["values"][0]), name
            continue
        problems = summary_check(buffers[name], e, tol["buffer_rtol"] * e["mean_abs"])
        assert not problems, f"{name} ({key}): {problems}"
    moved = [n for n, before in frozen.items() if not torch.equal(before, params[n])]
    assert not moved, f"frozen tensors moved: {moved[:5]}"
