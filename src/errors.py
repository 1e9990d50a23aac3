"""The suite's user-facing errors: a mistake in a file, a record, a checkpoint or a setting.

Every entry point prints a `UserError` as one message naming the file, record or key and what to do,
and exits non-zero without a traceback (`HYDRA_FULL_ERROR=1` shows it); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names the file / record / key and what to do."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (bad override value, unknown method or benchmark, conflicting switches)."""


class UnsafeFileError(UserError, ValueError):
    """A file refused because loading it could run code (a pickle of objects other than tensors)."""
