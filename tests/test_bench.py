"""`python -m src.bench`: options, the figures it records per method, and the data-pipeline figure."""

from __future__ import annotations

import json
import subprocess
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


def figures(method: str) -> dict:
    """What a worker process prints for `method` (made-up figures)."""
    phase = {"median_s": 0.5, "min_s": 0.4, "spread_s": 0.2, "images_per_s": 4.0, "peak_bytes": 2**30}
    return {"method": method, "device": "cpu", "precision": "fp32", "batch": 2, "image_size": 96,
            "train": phase, "eval": phase}


def test_a_stopped_bench_keeps_the_methods_that_finished(tmp_path: Path, monkeypatch, capsys) -> None:
    """The results file is rewritten after each method: stopped (Ctrl-C) during the second, it holds the first."""
    def worker(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        method = next(a.split("=", 1)[1] for a in cmd if a.startswith("worker="))
        if method == "adapter":
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(cmd, 0, stdout="log line\n" + json.dumps(figures(method)), stderr="")

    monkeypatch.setattr(bench.subprocess, "run", worker)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["methods=mapper,lora,adapter,full", f"out={out}"])
    report = json.loads(out.read_text())
    assert [r["method"] for r in report["methods"]] == ["mapper", "lora"]
    assert report["complete"] is False and report["pending"] == ["adapter", "full"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("bench 1/4: mapper done in ") and printed[1].endswith(
        "train step 0.500 s (4.00 img/s, peak 1.00 GiB), eval 0.500 s (4.00 img/s)")
    assert printed[2].startswith("bench 2/4: lora done in ") and len(printed) == 3
    assert not list(tmp_path.glob("*.partial"))


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
    assert report["complete"] is True and report["pending"] == [] and report["wall_seconds"] > 0
    printed = capsys.readouterr().out
    assert "| lora | cpu | fp32 | 2 |" in printed and "data pipeline:" in printed
    assert "bench 1/2: lora done in " in printed and "bench 2/2: frozen done in " in printed
