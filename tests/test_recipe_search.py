"""The default job's recipe-search script (experiments/synthetic_default/recipe_search.py) on CPU."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "experiments" / "synthetic_default" / "recipe_search.py"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """run_trial sets the process's torch thread count (it owns its process there); restore it here."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_script():
    spec = importlib.util.spec_from_file_location("recipe_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_trial_records_its_learning_curve(tmp_path: Path):
    search = load_script()
    trial = {
        "name": "tiny", "steps": 4, "eval_every": 2,
        "overrides": [f"paths.cache_dir={tmp_path / 'cache'}", "data.synthetic.n_train=8", "data.synthetic.n_val=4",
                      "data.synthetic.n_test=4", "data.batch_size=4", "vision_pretraining.steps=2",
                      "vision_pretraining.batch_size=2", "text_pretraining.steps=2", "text_pretraining.batch_size=2",
                      "pretraining_corpus.scenes=4"],
    }
    search.prepare(trial, threads=1)
    result = search.run_trial(trial, str(tmp_path), "cpu", threads=1, deadline=time.time() + 600)
    assert [p["step"] for p in result["curve"]] == [2, 4]
    for point in result["curve"]:
        assert 0 <= point["val"]["acc50"] <= 1 and 0 <= point["test"]["acc50"] <= 1 and 0 <= point["shuffled"] <= 1
    assert json.loads((tmp_path / "tiny.json").read_text())["best_val"] in result["curve"]


def test_a_trial_with_random_train_transforms_is_refused(tmp_path: Path):
    search = load_script()
    overrides = [f"paths.cache_dir={tmp_path / 'cache'}", "data.synthetic.n_train=4", "data.synthetic.n_val=2",
                 "data.synthetic.n_test=2", "data.augment.enabled=true", "vision_pretraining=null",
                 "text_pretraining=null"]
    trial = {"name": "aug", "steps": 2, "eval_every": 1, "overrides": overrides}
    with pytest.raises(ValueError, match="augment.enabled=false"):
        search.run_trial(trial, str(tmp_path), "cpu", threads=1, deadline=time.time() + 600)
