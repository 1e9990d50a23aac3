"""Search training recipes for the default synthetic job: many trials at once on one machine.

The default job must reach its accuracy within a few CPU minutes, so recipes are compared by their
learning curves at a fixed number of optimiser steps. Each trial is a list of Hydra overrides (on top
of the default job) plus a step budget; trials run as parallel processes, each training on in-memory
tensors with a plain loop (the default job's transforms are deterministic, so this is the same data
the Lightning run sees), and write `<name>.json`: val / test / shuffled-text Acc@0.5 every
`eval_every` steps. On a GPU the trials share it; on CPU give each trial `--threads`.

    python experiments/synthetic_default/recipe_search.py trials.json --out results/ --parallel 8

`trials.json` is a list of {"name": str, "overrides": [str], "steps": int, "eval_every": int}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hydra.utils import instantiate  # noqa: E402

from src.config import compose  # noqa: E402
from src.data.dataset import CachedSamples, collate  # noqa: E402
from src.pretraining.stages import apply_backbone_pretraining  # noqa: E402
from src.run import build_module  # noqa: E402
from src.training.lit import MODEL_INPUTS  # noqa: E402
from src.training.metrics import GroundingAccuracy  # noqa: E402

FIXED = ["data.cache_samples=true", "logger=none"]
# Overrides that change what the shared caches (benchmark, pretrained backbones) hold.
CACHE_KEYS = ("data.synthetic", "vision_pretraining", "text_pretraining", "pretraining_corpus", "model.")


def tensors(dataset: CachedSamples, device: torch.device) -> dict[str, torch.Tensor]:
    """All samples of a cached dataset, stacked and moved to `device`."""
    batch = collate(dataset.samples)
    return {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 250) -> dict[str, float]:
    """Acc@0.5 and mean IoU of `model` on stacked samples."""
    model.eval()
    metric = GroundingAccuracy().to(data["box"].device)
    for start in range(0, len(data["box"]), batch_size):
        part = {k: v[start:start + batch_size] for k, v in data.items()}
        metric.update(model(**{k: part[k] for k in MODEL_INPUTS}).boxes, part["box"])
    model.train()
    scores = metric.compute()
    return {"acc50": round(float(scores["acc50"]), 4), "miou": round(float(scores["miou"]), 4)}


def prepare(trial: dict[str, Any], threads: int) -> None:
    """Generate the trial's pretraining corpus and pretrain its backbones (cached), before trials run in parallel."""
    torch.set_num_threads(threads)
    cfg = compose([*trial["overrides"], *FIXED])
    apply_backbone_pretraining(cfg, instantiate(cfg.data))


def run_trial(trial: dict[str, Any], out_dir: str, device_name: str, threads: int, deadline: float) -> dict[str, Any]:
    """Train one trial for its step budget (or until the wall-clock `deadline`) and write its learning curve."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    start = time.perf_counter()
    cfg = compose([*trial["overrides"], *FIXED])
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data)
    apply_backbone_pretraining(cfg, datamodule)
    datamodule.setup("fit")
    datamodule.setup("test")
    train_set = datamodule.datasets[f"train:{datamodule.train_split}"]
    if not isinstance(train_set, CachedSamples):
        raise ValueError("the trial's train transform is random: set data.augment.enabled=false")
    train = tensors(train_set, device)
    val = tensors(datamodule.datasets[datamodule.val_split], device)
    test_split = datamodule.test_splits[0]
    test = tensors(datamodule.datasets[test_split], device)
    shuffled = tensors(datamodule.shuffled_text_dataloader(test_split).dataset, device)

    module = build_module(cfg).to(device)
    model, steps, batch_size = module.model, int(trial["steps"]), int(cfg.data.batch_size)
    optimizer, scheduler = module.build_optimizer(steps)
    model.train()
    curve: list[dict[str, Any]] = []
    order = torch.empty(0, dtype=torch.long)
    result = {"name": trial["name"], "overrides": trial["overrides"], "steps": steps, "curve": curve}
    for step in range(1, steps + 1):
        if len(order) < batch_size:  # a new epoch: reshuffle, drop the last partial batch
            order = torch.randperm(len(train["box"]))
        idx, order = order[:batch_size].to(device), order[batch_size:]
        batch = {k: v[idx] for k, v in train.items()}
        loss = module.loss(model(**{k: batch[k] for k in MODEL_INPUTS}).boxes, batch["box"])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        last = step == steps or time.time() > deadline
        if step % trial["eval_every"] == 0 or last:
            point = {"step": step, "loss": round(float(loss.detach()), 4), "val": accuracy(model, val),
                     "test": accuracy(model, test), "shuffled": accuracy(model, shuffled)["acc50"],
                     "seconds": round(time.perf_counter() - start, 1)}
            curve.append(point)
            Path(out_dir, f"{trial['name']}.json").write_text(json.dumps(result, indent=1))
            print(trial["name"], json.dumps(point), flush=True)
        if last:
            break
    best = max(curve, key=lambda p: p["val"]["acc50"])
    result["best_val"] = best
    Path(out_dir, f"{trial['name']}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trials", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock limit for all trials")
    args = parser.parse_args()
    deadline = time.time() + 60 * args.minutes
    trials = json.loads(args.trials.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    distinct = {}  # shared caches first, once per distinct setting, in parallel
    for trial in trials:
        key = [o for o in trial["overrides"] if o.lstrip("+~").startswith(CACHE_KEYS)]
        distinct.setdefault(json.dumps(key), trial)
    context = mp.get_context("spawn")
    with context.Pool(args.parallel) as pool:
        threads = max(1, (os.cpu_count() or 1) // len(distinct))
        pool.starmap(prepare, [(trial, threads) for trial in distinct.values()])
    with context.Pool(args.parallel, maxtasksperchild=1) as pool:
        jobs = [pool.apply_async(run_trial, (t, str(args.out), args.device, args.threads, deadline)) for t in trials]
        for trial, job in zip(trials, jobs, strict=True):
            try:
                result = job.get()
                best = result["best_val"]
                print(f"DONE {trial['name']}: best val {best['val']['acc50']} at step {best['step']}, "
                      f"test {best['test']['acc50']}, shuffled {best['shuffled']}", flush=True)
            except Exception as err:  # one broken trial must not lose the others
                print(f"FAILED {trial['name']}: {err!r}", flush=True)


if __name__ == "__main__":
    main()
