"""A user mistake ends a command with one `error: ...` message naming the file, record or key, never a
traceback; HYDRA_FULL_ERROR=1 shows the traceback; a failed run still writes results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.errors import UserError, as_user_error, reported_errors
from tests.conftest import PROJECT_ROOT
from tests.test_datamodule import make_referit_root
from tests.test_hard_inputs import CreatesAFile

FAST = ["vision_pretraining=null", "text_pretraining=null", "logger=csv", "callbacks.progress_bar=null", "visualize=0"]


def command(module: str, *args: str, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env |= {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"} | ({"HYDRA_FULL_ERROR": "1"} if full_error else {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_clear_line(done: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 1, an `error:` line holding every `expected` text, no traceback, no unsafe advice."""
    both = done.stdout + done.stderr
    assert done.returncode == 1, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    assert "weights_only=False" not in both
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def unsafe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A .ckpt that would create a marker file if it were ever unpickled without restrictions."""
    folder = tmp_path_factory.mktemp("unsafe")
    marker = folder / "pwned"
    torch.save({"state_dict": {}, "extra": CreatesAFile(marker)}, folder / "shared.ckpt")
    return folder / "shared.ckpt", marker


@pytest.mark.parametrize("train", ["false", "true"])
def test_unsafe_checkpoint_is_one_line_without_unsafe_advice(unsafe_checkpoint, tmp_path: Path, train: str) -> None:
    path, marker = unsafe_checkpoint
    done = command("src.run", *FAST, f"train={train}", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_clear_line(done, str(path), "refused to load", "`posix.system`", "never unpickles code")
    assert not marker.exists()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "refused to load" in results["reason"]


def test_unsafe_checkpoint_in_predict_is_one_line(unsafe_checkpoint, tmp_path: Path) -> None:
    path, marker = unsafe_checkpoint
    done = command("src.predict", f"ckpt={path}", f"image={tmp_path / 'a.png'}", "text=the cat")
    assert_one_clear_line(done, str(path), "refused to load")
    assert not marker.exists()


def test_bad_split_file_names_it(tmp_path: Path) -> None:
    root = make_referit_root(tmp_path, {"train": 8, "val": 4, "test": 4})
    split = root / "splits" / "referit" / "referit_train.pth"
    split.write_bytes(b"\x80\x02 not a pickle")
    done = command("src.run", *FAST, "data=referit", f"data.split_root={root / 'splits'}",
                   f"data.image_root={root / 'images'}", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_clear_line(done, str(split), "not a readable split file")


@pytest.mark.parametrize("override,expected", [
    ("trainer.precision=16-true", "trainer.precision=16-true is not supported"),
    ("data.dataset=nope", "unknown benchmark 'nope'"),
    ("model.mode=faithful", "mode must be one of"),
    ("ckpt_path=last", "ckpt_path=last: none of the"),
])
def test_bad_setting_is_one_line(tmp_path: Path, override: str, expected: str) -> None:
    done = command("src.run", *FAST, override, f"hydra.run.dir={tmp_path / 'run'}",
                   f"resume_roots=[{tmp_path / 'nothing'}]")
    assert_one_clear_line(done, expected)


def test_unknown_method_is_hydras_own_short_message(tmp_path: Path) -> None:
    done = command("src.run", "peft=nope", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Could not find 'peft/nope'" in done.stderr and "mapper" in done.stderr  # lists the known methods


def test_full_error_shows_the_traceback(tmp_path: Path) -> None:
    done = command("src.run", *FAST, "trainer.precision=16-true", f"hydra.run.dir={tmp_path / 'run'}",
                   full_error=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "ConfigError" in done.stderr


def test_reported_errors_unwraps_user_errors_and_keeps_bugs() -> None:
    wrapped = RuntimeError("Error in call to target 'x'")
    wrapped.__cause__ = UserError("peft.rank must be >= 1")
    assert str(as_user_error(wrapped)) == "peft.rank must be >= 1"
    with pytest.raises(SystemExit) as stopped, reported_errors(stream=sys.stdout):
        raise wrapped
    assert stopped.value.code == 1
    with pytest.raises(KeyError), reported_errors():
        raise KeyError("a bug keeps its traceback")
