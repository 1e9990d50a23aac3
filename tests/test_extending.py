"""docs/EXTENDING.md does what it says: its files, written into a folder outside the suite, are a PEFT method
and a benchmark of one's own that its commands (run as shown, at test sizes) train, evaluate and refuse."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from src.analysis.table import RESULTS_NAME
from src.data.benchmarks import BENCHMARKS
from src.models.peft import registry
from src.models.roles import TEXT_FAMILIES
from tests.conftest import PROJECT_ROOT
from tests.test_backbones import train_one_step
from tests.test_datamodule import make_benchmark_root
from tests.test_default_job import TINY_JOB
from tests.test_peft_methods import HEAD, built, check_starts_as_declared, check_trains_what_it_declares

PAGE = (PROJECT_ROOT / "docs" / "EXTENDING.md").read_text()
# The files the page shows: a line "`<path>`:", a blank line, a fenced block.
FILES = dict(re.findall(r"^`([\w./-]+)`:\n\n```\w+\n(.*?)^```$", PAGE, re.M | re.S))
COMMANDS = [line for block in re.findall(r"^```bash\n(.*?)^```$", PAGE, re.M | re.S)
            for line in block.splitlines() if "python -m src.run" in line]
CHECKPOINT = "outputs/ln_tuning_synthetic/<date>/checkpoints/<best>.ckpt"  # the page's placeholder
QUIET = ["logger=csv", "visualize=0", "shuffled_text_check=false", "callbacks.progress_bar=null"]


def test_the_page_shows_a_method_a_library_method_a_benchmark_and_their_commands():
    assert set(FILES) == {"myrec/ln_tuning.py", "myconf/peft/ln_tuning.yaml", "myconf/peft/lora_mlp.yaml",
                          "myrec/toyrefs.py", "myconf/data/toyrefs.yaml", "myconf/experiment/toyrefs.yaml",
                          "myrec/mpnet.py", "myconf/model/deit_mpnet_tiny.yaml"}
    assert len(COMMANDS) == 5, COMMANDS


@pytest.fixture(scope="module")
def my_rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The page's folder of one's own: its files, and ToyRefs' images and split files where it says."""
    root = tmp_path_factory.mktemp("my-rec")
    for path, text in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    make_benchmark_root(root / "data" / "toyrefs", "toyrefs", {"train": 8, "val": 4, "test": 4})
    return root


def run_page_command(command: str, root: Path, *sizes: str) -> subprocess.CompletedProcess:
    """One of the page's commands, run from `root` as shown, with `sizes` (test-size overrides) added. The
    suite itself is on the path as an installed suite would be."""
    own = command.startswith("PYTHONPATH=$PWD ")
    args = shlex.split(command.removeprefix("PYTHONPATH=$PWD ").replace("$PWD", str(root)))
    assert args[:3] == ["python", "-m", "src.run"], command
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root)] * own + [str(PROJECT_ROOT)]),
                        "REC_RUNS_ROOT": str(root), "REC_CACHE_DIR": str(root / ".cache"), "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, *args[1:], *sizes], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def results_line(folder: Path) -> dict:
    """The one results line a run wrote in its folder."""
    [line] = (folder / RESULTS_NAME).read_text().splitlines()
    return json.loads(line)


@pytest.fixture
def own_package(my_rec: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The folder on this process's path; what its plugins register is forgotten afterwards."""
    monkeypatch.syspath_prepend(str(my_rec))
    yield my_rec
    for name in [m for m in sys.modules if m == "myrec" or m.startswith("myrec.")]:
        del sys.modules[name]
    registry._METHODS.pop("ln_tuning", None)
    BENCHMARKS.pop("toyrefs", None)
    TEXT_FAMILIES.pop("mpnet", None)


def test_the_pages_methods_train_what_they_declare_and_start_as_they_say(own_package: Path):
    searchpath = f"hydra.searchpath=[file://{own_package}/myconf]"
    method, model = built("ln_tuning", "plugins=[myrec.ln_tuning]", searchpath)
    check_trains_what_it_declares("ln_tuning", method, model)
    assert all(".norm" in n or "LayerNorm" in n for n in model.tunable_backbone_names)
    check_starts_as_declared(method, model)
    method, model = built("lora_mlp", searchpath)
    check_trains_what_it_declares("lora_mlp", method, model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEAD)]
    assert any(".mlp.fc1.lora_A." in n for n in trained) and any(".intermediate.dense.lora_A." in n for n in trained)
    assert method.rank == 4
    check_starts_as_declared(method, model)


@pytest.mark.slow
def test_a_method_of_ones_own_trains_evaluates_where_listed_and_is_refused_elsewhere(my_rec: Path):
    train, evaluate, refused, *_ = COMMANDS
    done = run_page_command(train, my_rec, *TINY_JOB, *QUIET)
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = (my_rec / "outputs" / "ln_tuning_synthetic").iterdir()
    line = results_line(folder)
    assert (line["method"], line["experiment"], line["kind"]) == ("ln_tuning", "ln_tuning_synthetic", "training")
    assert line["tunable_backbone"] > 0
    [best] = (folder / "checkpoints").glob("best-*.ckpt")
    checkpoint = str(best.relative_to(my_rec))

    data = [o for o in TINY_JOB if o.startswith("data.")]
    done = run_page_command(evaluate.replace(CHECKPOINT, checkpoint), my_rec, *data, *QUIET)
    assert done.returncode == 0, done.stderr[-3000:]
    # named before the checkpoint is read, the folder is the command line's; the results line the checkpoint's
    [folder] = (my_rec / "outputs" / "mapper_synthetic").iterdir()
    evaluation = results_line(folder)
    assert (evaluation["method"], evaluation["experiment"], evaluation["kind"]) == (
        "ln_tuning", "ln_tuning_synthetic", "evaluation")
    assert evaluation["splits"] == line["splits"]

    done = run_page_command(refused.replace(CHECKPOINT, checkpoint), my_rec, *data, *QUIET)
    assert done.returncode == 1
    shown = re.search(r"^error: .*$", PAGE, re.M).group(0)
    assert done.stderr.strip().splitlines()[-1] == shown.replace(CHECKPOINT, checkpoint)


@pytest.mark.slow
def test_a_benchmark_of_ones_own_trains_and_tests_on_its_own_splits(my_rec: Path):
    done = run_page_command(COMMANDS[3], my_rec, "trainer.max_epochs=1", "data.batch_size=4", "data.num_workers=0",
                            *QUIET)
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = (my_rec / "outputs" / "lora_toyrefs").iterdir()
    line = results_line(folder)
    assert (line["benchmark"], line["method"], line["experiment"]) == ("toyrefs", "lora", "lora_toyrefs")
    assert line["splits"]["test"]["n"] == 4


# Where each method's text modules sit in an MPNet layer (the page's roles).
MPNET_PARTS = {"adapter": r"encoder\.layer\.1\.output\.adapter\.", "mapper": r"encoder\.layer\.1\.output\.adapter\.",
               "lora": r"encoder\.layer\.1\.attention\.attn\.[qkvo]\.lora_"}


@pytest.mark.parametrize("method", sorted(MPNET_PARTS))
def test_the_pages_backbone_family_takes_every_method(own_package: Path, method: str, tmp_path: Path):
    overrides = ["plugins=[myrec.mpnet]", f"hydra.searchpath=[file://{own_package}/myconf]", "model=deit_mpnet_tiny"]
    train_one_step(overrides, method, MPNET_PARTS[method], tmp_path)


@pytest.mark.slow
def test_the_pages_backbone_command_trains_and_tests(my_rec: Path):
    done = run_page_command(COMMANDS[4], my_rec, *TINY_JOB, *QUIET)
    assert done.returncode == 0, done.stderr[-3000:]
    [folder] = (my_rec / "outputs" / "lora_synthetic").iterdir()
    line = results_line(folder)
    assert (line["method"], line["kind"]) == ("lora", "training") and line["tunable_backbone"] > 0
    assert line["recipe_settings"]["model.text.arch"] == "mpnet"
