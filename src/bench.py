"""Training and evaluation speed and memory per PEFT method: `python -m src.bench [options] [overrides]`.

    python -m src.bench                                   # full size, one method of each kind; CPU fp32
    python -m src.bench methods=mapper,lora device=cuda precision=bf16 steps=20
    python -m src.bench methods=mapper model=mapper_tiny batch=8 out=bench.json

Each method runs in a fresh process (so that peak memory is its own). After `warmup` untimed steps it
times `steps` training steps (forward, loss, backward, optimiser step) and `steps` evaluation forwards
on random inputs of the configured size (default: `model=mapper_base model.pretrained=false`, 518 px,
query length 20, batch 2), and records the median, min and spread (max - min) of each, images/s and
peak memory: on CPU the RSS high-water mark of the timed phase, on GPU the peak allocated memory.
Options (key=value): `methods=` (comma-separated peft configs; default: one of each kind, every method config
that varies no other: `python -m src.methods` lists them), `steps=5`, `warmup=1`, `batch=2`,
`device=auto|cpu|cuda`, `precision=fp32|bf16` (bf16 autocast; weights stay fp32), `out=FILE.json`,
`data=true|false` (also measure the data pipeline). Anything else is a Hydra override of the model.
Prints a line per method as its process ends and a markdown table at the end; `out=` also writes the figures
as JSON, rewritten after each method (`complete: false` and the `pending` methods until the bench ends), so a
stopped bench keeps what finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from src.methods import base_method_names
from src.progress import duration

OPTIONS = {"methods": ",".join(base_method_names()), "steps": "5", "warmup": "1", "batch": "2", "device": "auto",
           "precision": "fp32", "out": "", "data": "true"}
# mapper_base is the paper's size: 518 px, query length 20
MODEL_DEFAULTS = ["model=mapper_base", "model.pretrained=false", "vision_pretraining=null", "text_pretraining=null",
                  "paths.output_dir=unused"]


def parse(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """(bench options, Hydra overrides) from key=value arguments."""
    options, overrides = dict(OPTIONS), []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value, got {arg!r}\n\n{__doc__}")
        if key in OPTIONS or key == "worker":
            options[key] = value
        else:
            overrides.append(arg)
    if options["precision"] not in ("fp32", "bf16"):
        raise SystemExit("precision must be fp32 or bf16")
    return options, overrides


def timings(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and spread (max - min) of a series of durations, in seconds."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "spread_s": max(seconds) - min(seconds)}


def random_batch(cfg: Any, batch: int, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs of the configured size (real-looking token ids and masks) and target boxes."""
    g = torch.Generator().manual_seed(0)
    size, length = int(cfg.model.image_size), int(cfg.model.max_query_len)
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, : max(2, length // 2)] = 1
    inputs = {
        "image": torch.randn(batch, 3, size, size, generator=g),
        "pixel_mask": torch.zeros(batch, size, size, dtype=torch.bool),
        "text_ids": torch.randint(1000, 20000, (batch, length), generator=g) * mask,
        "text_mask": mask,
        "prior_ids": torch.randint(1000, 40000, (batch, length), generator=g) * mask,
        "prior_mask": mask.clone(),
    }
    boxes = torch.rand(batch, 4, generator=g) * 0.4 + 0.3
    return {k: v.to(device) for k, v in inputs.items()}, boxes.to(device)


def timed(fn: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Wall time of `n` calls of `fn`, synchronising the GPU around each."""
    out = []
    for _ in range(n):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def measure_method(method: str, options: dict[str, str], overrides: list[str]) -> dict[str, Any]:
    """Train-step and eval-forward figures of one PEFT method (run in its own process)."""
    from src.analysis.table import peak_memory_bytes, reset_peak_memory
    from src.config import compose, resolve_device
    from src.params import parameter_report
    from src.run import build_seeded_module

    cfg = compose([*MODEL_DEFAULTS, f"peft={method}", *overrides])
    device = resolve_device(options["device"])
    module = build_seeded_module(cfg).to(device)
    optimizer, _ = module.build_optimizer(total_steps=1000)
    inputs, boxes = random_batch(cfg, int(options["batch"]), device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if options["precision"] == "bf16" else (
        contextlib.nullcontext)
    steps, warmup = int(options["steps"]), int(options["warmup"])

    def train_step() -> None:
        with autocast():
            loss = module.loss(module.model(**inputs).boxes, boxes)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_forward() -> None:
        with autocast():
            module.model(**inputs)

    module.model.train()
    first = timed(train_step, warmup, device)  # with model.compile=true the first step compiles
    reset_peak_memory()
    train = timed(train_step, steps, device)
    train_peak = peak_memory_bytes()
    module.model.eval()
    timed(eval_forward, warmup, device)
    reset_peak_memory()
    evaluation = timed(eval_forward, steps, device)
    eval_peak = peak_memory_bytes()
    batch = int(options["batch"])
    params = parameter_report(module.model)
    return {
        "method": method, "device": str(device), "precision": options["precision"], "batch": batch,
        "image_size": int(cfg.model.image_size), "threads": torch.get_num_threads(), "steps": steps,
        "tunable_backbone": params.get("tunable_backbone"), "trainable": params.get("trainable"),
        "train": timings(train) | {"steps_per_s": 1 / statistics.median(train),
                                   "images_per_s": batch / statistics.median(train), "peak_bytes": train_peak,
                                   "first_step_s": first[0] if first else None},
        "eval": timings(evaluation) | {"images_per_s": batch / statistics.median(evaluation),
                                       "peak_bytes": eval_peak},
    }


def measure_data(batch: int, image_size: int, samples: int = 32) -> dict[str, Any]:
    """Samples/s of one loading process: decode real-size JPEGs (640 x 480), augment, tokenise, collate."""
    from PIL import Image

    from src.data.dataset import RecordDataset, collate
    from src.data.records import Record
    from src.data.tokenizers import bert_tokenizer, clip_tokenizer
    from src.data.transforms import AugmentSettings, build_transform

    with tempfile.TemporaryDirectory() as folder:
        g = torch.Generator().manual_seed(0)
        for i in range(8):
            pixels = (torch.rand(480, 640, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels).save(Path(folder) / f"{i}.jpg", quality=90)
        records = [Record(f"{i % 8}.jpg", (100.0, 80.0, 300.0, 400.0), "the man in the red shirt")
                   for i in range(samples)]
        dataset = RecordDataset(records, folder, build_transform(True, image_size, AugmentSettings(), "clean"),
                                bert_tokenizer(None), clip_tokenizer(None), 20)
        start = time.perf_counter()
        for first in range(0, samples, batch):
            collate([dataset[i] for i in range(first, min(first + batch, samples))])
        seconds = time.perf_counter() - start
    return {"samples_per_s_per_worker": samples / seconds, "image": "640x480 JPEG", "transform": "train (augmented)"}


def run_worker(method: str, options: dict[str, str], overrides: list[str]) -> dict[str, Any]:
    """One method measured in a fresh `python -m src.bench worker=<method>` process; its JSON result."""
    args = [f"{k}={v}" for k, v in options.items() if k not in ("methods", "out", "data")]
    proc = subprocess.run([sys.executable, "-m", "src.bench", f"worker={method}", *args, *overrides],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method}: the benchmark process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def method_line(result: dict[str, Any], done: int, total: int, seconds: float) -> str:
    """The line printed when a method's process finishes: its main figures and how long it took."""
    t, e, gib = result["train"], result["eval"], 1024**3
    return (f"bench {done}/{total}: {result['method']} done in {seconds:.0f} s: train step {t['median_s']:.3f} s "
            f"({t['images_per_s']:.2f} img/s, peak {t['peak_bytes'] / gib:.2f} GiB), eval {e['median_s']:.3f} s "
            f"({e['images_per_s']:.2f} img/s)")


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Replace the results file in one step (written beside it, then moved), so a stop never leaves half a file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    os.replace(partial, path)


def table(results: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the results."""
    gib = 1024**3
    lines = ["| method | device | precision | batch | train step median (min, spread) | train img/s | train peak "
             "| eval median (min, spread) | eval img/s | eval peak |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t, e = r["train"], r["eval"]
        lines.append(
            f"| {r['method']} | {r['device']} | {r['precision']} | {r['batch']} | {t['median_s']:.3f} s "
            f"({t['min_s']:.3f}, {t['spread_s']:.3f}) | {t['images_per_s']:.2f} | {t['peak_bytes'] / gib:.2f} GiB "
            f"| {e['median_s']:.3f} s ({e['min_s']:.3f}, {e['spread_s']:.3f}) | {e['images_per_s']:.2f} "
            f"| {e['peak_bytes'] / gib:.2f} GiB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    options, overrides = parse(sys.argv[1:] if argv is None else argv)
    if "worker" in options:
        print(json.dumps(measure_method(options["worker"], options, overrides)))
        return 0
    methods = [m for m in options["methods"].split(",") if m]
    out = Path(options["out"]) if options["out"] else None
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"complete": False, "methods": results, "pending": methods, "overrides": overrides}
    start = time.perf_counter()
    print(f"bench: {len(methods)} methods ({', '.join(methods)}), each in its own process"
          + (f"; {out} is rewritten after each" if out else ""), flush=True)
    for done, method in enumerate(methods, 1):
        began = time.perf_counter()
        results.append(run_worker(method, options, overrides))
        report["pending"] = methods[done:]
        print(method_line(results[-1], done, len(methods), time.perf_counter() - began), flush=True)
        if out:  # a stopped bench keeps the methods that finished
            write_report(out, report)
    print(table(results))
    if options["data"].lower() in ("1", "true", "yes"):
        report["data_pipeline"] = measure_data(int(options["batch"]), results[0]["image_size"] if results else 518)
        consumed = ", ".join(f"{r['method']} {r['train']['images_per_s']:.1f}" for r in results)
        supplied = report["data_pipeline"]["samples_per_s_per_worker"]
        print(f"\ndata pipeline: {supplied:.1f} samples/s per loading process (640x480 JPEG, train transform); "
              f"training consumes {consumed} samples/s")
    report |= {"complete": True, "wall_seconds": round(time.perf_counter() - start, 1)}
    print(f"\nbench took {duration(report['wall_seconds'])}")
    if out:
        write_report(out, report)
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
