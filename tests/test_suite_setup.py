"""The test suite's own set-up (tests/conftest.py): where it writes and what it needs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import SCRATCH_TOOL_DIRS, require_free_space


def test_a_too_full_disk_stops_the_suite_in_one_line(tmp_path: Path) -> None:
    require_free_space(tmp_path, required_gib=0.0)
    with pytest.raises(pytest.exit.Exception, match=r"GiB free under .*: free some space or point TMPDIR"):
        require_free_space(tmp_path, required_gib=1e9)


def test_tools_write_into_the_suites_scratch_folder_not_the_home_folder() -> None:
    scratch = os.environ["REC_TESTS_SCRATCH"]
    for variable in (*SCRATCH_TOOL_DIRS, "REC_RUNS_ROOT"):
        assert Path(os.environ[variable]).is_relative_to(scratch), variable
