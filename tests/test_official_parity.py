"""Official mode computes what the official MaPPER code computes (golden fixtures in ../shared/parity).

One test per case file (`$MAPPER_PARITY_CASES`, default ../shared/parity/cases): regenerate the case's
official-format weights from the manifest and recipe, convert them with the converter's own code
(`src.convert_official.convert_official`), feed the case's inputs and compare the boxes and the five
intermediate summaries with the tolerances of ../shared/parity/README.md §5.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from src.convert_official import convert_official
from src.models.official import DROP_CHECKS, drop_reason
from tests.conftest import SHARED
from tests.parity_recipe import load_manifest, recipe_inputs, recipe_state_dict

PARITY_DIR = SHARED / "parity"
CASES_DIR = Path(os.environ.get("MAPPER_PARITY_CASES", PARITY_DIR / "cases"))
CASE_FILES = sorted(CASES_DIR.glob("*.json")) if CASES_DIR.is_dir() else []
SUMMARIES = ("visual", "bert", "clip_prior", "pgt", "vl_reg")


def _case_params() -> list[Any]:
    if CASE_FILES:
        return [pytest.param(path, id=path.name) for path in CASE_FILES]
    return [pytest.param(None, id="no-cases", marks=pytest.mark.skip(reason=f"no parity cases in {CASES_DIR}"))]


def _needed(key: str) -> bool:
    """Tensors the converter keeps (plus those whose dropping it checks).

    The recipe seeds every tensor separately, so skipping the rest changes nothing else; they are the
    ones ../shared/parity/README.md lists as unused (checked there by perturbing them: boxes unchanged),
    and skipping them saves generating ~115M of the 385M random numbers.
    """
    return drop_reason(key) is None or key in DROP_CHECKS


def summary_errors(got: torch.Tensor, expected: dict[str, Any]) -> dict[str, float]:
    """The three §5 errors, each divided by its allowance (rtol * mean_abs [* numel]): pass iff all <= 1."""
    assert list(got.shape) == expected["shape"]
    t = got.detach().to(torch.float64)
    if expected["tokens"] is None:
        values = t[:, expected["channels"]]
    else:
        values = t[:, expected["tokens"]][:, :, expected["channels"]]
    scale = expected["rtol"] * expected["mean_abs"]
    return {
        "values": ((values - torch.tensor(expected["values"], dtype=torch.float64)).abs().max() / scale).item(),
        "mean_abs": abs(t.abs().mean().item() - expected["mean_abs"]) / scale,
        "sum": abs(t.sum().item() - expected["sum"]) / (scale * expected["numel"]),
    }


@pytest.fixture
def two_threads():
    """The fixtures were recorded with 2 intra-op threads (the tolerances leave ample room anyway)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("case_file", _case_params())
def test_official_mode_matches_official_code(case_file: Path, shared_dir: Path, two_threads: None) -> None:
    case = json.loads(case_file.read_text())
    manifest_path = PARITY_DIR / case["weights"]["manifest"]  # resolved in the parity folder, not beside the case
    if not manifest_path.is_file():
        pytest.skip(f"parity manifest {manifest_path} is absent")
    official = recipe_state_dict(load_manifest(manifest_path), case["weights"], keep=_needed)

    # The converter's own path: geometry from the checkpoint's shapes (which must agree with the case),
    # a random-init mode=official model without downloads, strict load raising every problem at once.
    inputs = case["inputs"]
    model, conversion, _ = convert_official(
        official, max_query_len=int(inputs["max_query_len"]), image_size=int(inputs["image_size"])
    )
    assert not conversion.unmapped and set(conversion.dropped) <= set(DROP_CHECKS)
    del official, conversion
    model.eval()

    x = recipe_inputs(inputs)
    with torch.no_grad():
        out = model(**x, return_features=True)

    expected = case["expected"]
    box_error = (out.boxes.double() - torch.tensor(expected["pred_boxes"], dtype=torch.float64)).abs().max().item()
    errors = {name: summary_errors(out.features[name], expected["intermediates"][name]) for name in SUMMARIES}
    worst = {name: max(e.values()) for name, e in errors.items()}
    print(f"\n{case_file.name}: max box error {box_error:.2e} (atol {expected['atol']:.0e}); summary error / "
          "allowance: " + ", ".join(f"{n} {w:.2e}" for n, w in worst.items()))
    assert box_error <= expected["atol"], f"boxes off by {box_error:.3e} > atol {expected['atol']}"
    failing = {name: e for name, e in errors.items() if max(e.values()) > 1}
    assert not failing, f"summaries outside tolerance (error / allowance): {failing}"
