"""`python -m src.bench`: options, the figures it records per method, and the data-pipeline figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from src import bench


def test_options_and_overrides_are_told_apart() -> None:
    options, overrides = bench.parse(["methods=lora", "steps=3", "model=mapper_tiny", "peft.rank=4"])
    assert options["methods"] == "lora" and options["steps"] == "3" and options["precision"] == "fp32"
    assert overrides == ["model=mapper_tiny", "peft.rank=4"]
    with pytest.raises(SystemExit, match="precision"):
        bench.parse(["precision=fp8"])
    with pytest.raises(SystemExit, match="key=value"):
        bench.parse(["lora"])


def test_timings() -> None:
    assert bench.timings([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "spread_s": 2.0}


@pytest.mark.slow
def test_each_method_is_measured_in_its_own_process(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["methods=lora,frozen", "model=mapper_tiny", "steps=2", "batch=2", f"out={out}"]) == 0
    report = json.loads(out.read_text())
    lora, frozen = report["methods"]
    assert (lora["method"], frozen["method"]) == ("lora", "frozen") and lora["image_size"] == 96
    for result in (lora, frozen):
        for phase in ("train", "eval"):
            figures = result[phase]
            assert 0 < figures["min_s"] <= figures["median_s"] and figures["spread_s"] >= 0
            assert figures["images_per_s"] == pytest.approx(2 / figures["median_s"])
            assert figures["peak_bytes"] > 50 * 2**20  # an RSS high-water mark: at least the loaded model
    assert lora["tunable_backbone"] > 0 == frozen["tunable_backbone"]
    assert report["data_pipeline"]["samples_per_s_per_worker"] > 0
    printed = capsys.readouterr().out
    assert "| lora | cpu | fp32 | 2 |" in printed and "data pipeline:" in printed
