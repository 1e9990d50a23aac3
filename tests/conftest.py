"""Shared test fixtures: the ../shared folder (skipped when absent) and tiny model settings."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


# Folders that tools would otherwise keep under the home folder or /tmp after the suite ends.
SCRATCH_TOOL_DIRS = {"WANDB_DATA_DIR": "wandb-data", "WANDB_CACHE_DIR": "wandb-cache",
                     "WANDB_CONFIG_DIR": "wandb-config", "TORCHINDUCTOR_CACHE_DIR": "inductor"}


# What the whole suite writes at most into the temporary folder (scratch, pytest's tmp_path, the subprocess runs'
# checkpoints): 3.3 GiB at its peak in a fresh clone (2026-12-05, two workers, disk use sampled every second), with
# a margin. The install (.venv, 6.6 GiB) comes before and is not counted.
REQUIRED_FREE_GIB = 5.0


def require_free_space(folder: Path, required_gib: float = REQUIRED_FREE_GIB) -> None:
    """Stop at once, in one line, when the temporary folder's disk is too full for the suite: otherwise
    hundreds of tests fail one by one (No space left on device) in fixtures and subprocesses."""
    free = shutil.disk_usage(folder).free / 2**30
    if free < required_gib:
        pytest.exit(f"only {free:.1f} GiB free under {folder}, the test suite needs about {required_gib:.0f} GiB "
                    "there: free some space or point TMPDIR at a larger disk", returncode=4)


def pytest_configure(config: pytest.Config) -> None:
    """Tests leave no trace in the checkout: run folders (outputs/, multirun/) and caches (the synthetic
    benchmark, pretraining stages) go to one temporary folder per session, removed when it ends. Made here,
    not at import, so modules importing `tests.conftest` for its constants make no folder.

    Under pytest-xdist (`make test` runs two workers) the workers share the controller's folder and its cache
    (cache entries are built under a lock), each with run folders of its own: Hydra names them by the second,
    so two workers' CLI runs could otherwise meet in one folder. Each worker's torch then takes its share of
    the cores, as do the processes it starts (OMP_NUM_THREADS)."""
    scratch = os.environ.get("REC_TESTS_SCRATCH")
    if scratch is None:
        require_free_space(Path(tempfile.gettempdir()))
        scratch = tempfile.mkdtemp(prefix="rec-tests-")
        os.environ["REC_TESTS_SCRATCH"] = scratch
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    os.environ["REC_RUNS_ROOT"] = os.path.join(scratch, f"runs-{worker}" if worker else "runs")
    os.environ.setdefault("REC_CACHE_DIR", os.path.join(scratch, "cache"))
    for variable, folder in SCRATCH_TOOL_DIRS.items():  # W&B's staging area and inductor's cache, not the home folder
        os.environ[variable] = os.path.join(scratch, folder)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder; tests using it skip when it is absent (e.g. a user's clone)."""
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (it only exists beside the developers' and CI's checkout)")
    return SHARED


TINY_MODEL = dict(
    image_size=32,
    max_query_len=8,
    vision=dict(arch="vit_small_patch14_reg4_dinov2", patch_size=8, embed_dim=32, depth=4, num_heads=2,
                reg_tokens=4, init_values=1.0),
    text=dict(config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                          vocab_size=200)),
    prior=dict(config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                           projection_dim=16, vocab_size=300)),
    fusion=dict(dim=32, heads=2, ffn_dim=64, layers=2, dropout=0.0),
    adapter_layers=dict(vision=[1, 3], text=[1, 3]),
)

# Smaller modules for the methods whose defaults are large beside the tiny model, by registered method.
SMALL_METHODS: dict[str, dict[str, int]] = {
    "mapper": dict(rank=4, loca_hidden=12, loca_branch1=8, loca_branch2_mid=4, loca_branch2_out=4),
}


def at_test_size(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """`cfg` (in place) with its PEFT method's modules shrunk as SMALL_METHODS says, but for the settings
    `overrides` (the overrides `cfg` was composed with) set."""
    given = {o.split("=", 1)[0] for o in overrides}
    small = SMALL_METHODS.get(cfg.peft.get("method"), {})
    cfg.peft.update({k: v for k, v in small.items() if f"peft.{k}" not in given})
    return cfg
