"""The suite's user-facing errors: a mistake in a file, a record, a checkpoint or a setting.

Every entry point prints a `UserError` as one message naming the file, record or key and what to do,
and exits non-zero without a traceback (`HYDRA_FULL_ERROR=1` shows it); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class UserError(Exception):
    """A failure the user can act on (a mistake in a file, record, checkpoint or setting, or a diverged
    run); the message names the file / record / key and what to do."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (bad override value, unknown method or benchmark, conflicting switches)."""


class UnsafeFileError(UserError, ValueError):
    """A file refused because loading it could run code (a pickle of objects other than tensors)."""


# Set to 1 to see the traceback of a UserError too (Hydra's own switch for the same thing).
TRACEBACK_ENV = "HYDRA_FULL_ERROR"


def as_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`: itself, or the cause it wraps (Hydra wraps what a config's target raises)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__
    return None


@contextmanager
def reported_errors(stream: TextIO | None = None) -> Iterator[None]:
    """Print a UserError raised inside as one `error: ...` message and exit with status 1, without a
    traceback (unless HYDRA_FULL_ERROR=1); any other exception is a bug and keeps its traceback."""
    try:
        yield
    except Exception as err:
        user = as_user_error(err)
        if user is None or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"error: {user}", file=stream or sys.stderr, flush=True)
        raise SystemExit(1) from None
