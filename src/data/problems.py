"""What happens to a record that cannot be used: fail fast naming it, or skip it and count it.

`data.bad_records: fail` (default) stops at the first unreadable image or box outside its image with an
error naming the split file, the record and the reason. `skip` leaves the record out of its batch; the
batch carries it under `skipped`, the LightningModule counts it (`SkippedRecords`), warns in the log and
`results.json` reports the counts per stage and split. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch.distributed as dist

from src.errors import ConfigError, UserError

log = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("fail", "skip")
WARNED_PER_STAGE = 10  # skipped records named one by one in the log, per stage; the rest are counted


class DataError(UserError, ValueError):
    """Data that cannot be trained or evaluated on; the message names the file (and the record)."""


class BadRecordError(DataError):
    """A record that cannot be used; the message is `<kind>: <split file>: record <i> ...: <details>`.

    One message argument only, so that a DataLoader worker can re-raise it in the main process.
    """

    @property
    def kind(self) -> str:
        """The kind of problem ("unreadable image", "box outside the image"): the message's first part."""
        return str(self).split(":", 1)[0]


def check_policy(policy: str) -> str:
    """Validate a `bad_records` setting."""
    if policy not in BAD_RECORD_POLICIES:
        raise ConfigError(f"data.bad_records must be one of {BAD_RECORD_POLICIES}, got {policy!r}")
    return policy


class SkippedRecords:
    """Distinct skipped records per stage ("train", "val", "test/<split>"): index -> (kind, message).

    Kept by record index, so a bad record met in every epoch counts once.
    """

    def __init__(self) -> None:
        """Start empty."""
        self.by_stage: dict[str, dict[int, tuple[str, str]]] = {}

    def note(self, stage: str, skipped: Iterable[tuple[int, str, str]]) -> None:
        """Record a batch's skipped (index, kind, message); warn for the first few new ones of a stage."""
        seen = self.by_stage.setdefault(stage, {})
        for index, kind, message in skipped:
            if index in seen:
                continue
            seen[index] = (kind, message)
            if len(seen) <= WARNED_PER_STAGE:
                log.warning("%s: skipped a record (data.bad_records=skip): %s", stage, message)
            elif len(seen) == WARNED_PER_STAGE + 1:
                log.warning("%s: more records skipped; counted in results.json", stage)

    def gathered(self) -> dict[str, dict[int, tuple[str, str]]]:
        """The union over all processes (under torch.distributed), else this process's own."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.by_stage
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.by_stage)
        merged: dict[str, dict[int, tuple[str, str]]] = {}
        for part in parts:
            for stage, records in part.items():
                merged.setdefault(stage, {}).update(records)
        return merged

    def summary(self, examples: int = 5) -> dict[str, Any]:
        """Per stage: count, counts by kind of problem, and the first few messages (for results.json)."""
        out: dict[str, Any] = {}
        for stage, records in sorted(self.gathered().items()):
            out[stage] = {
                "count": len(records),
                "kinds": dict(Counter(kind for kind, _ in records.values())),
                "examples": [records[i][1] for i in sorted(records)[:examples]],
            }
        return out
