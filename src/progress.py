"""Progress lines for steps that take more than a few seconds, as readable in a log file as in a terminal.

A loop reports `update(done)` after each item; a plain line (no carriage-return redrawing, so a log file keeps
it) such as `vision pretraining: 400/1000 steps (40%), loss 1.234, 35.2 steps/s, 17 s left` is written every
`every_s` seconds, and every `every_n` items when set. A loop that ends before the first interval writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

EVERY_S = 10.0  # seconds between two lines of a loop, unless told otherwise


def duration(seconds: float) -> str:
    """A duration for people: `42 s`, `3 min 05 s`, `1 h 02 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def figure(value: float | int | str) -> str:
    """A figure in a progress line: floats to 4 significant digits, the rest as they are."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Throttled progress lines of a loop over `total` items (`unit`; 0 when unknown), sent to `emit`.

    `due(done)` is cheap (a clock read), so that a caller computes what costs something, e.g. a loss that needs a
    host sync, only for the lines it writes: `if progress.due(step): progress.update(step, loss=loss.item())`.
    Speed and time left are averaged since the start.
    """

    def __init__(
        self, what: str, total: int, emit: Callable[[str], None], unit: str = "steps", every_s: float | None = None,
        every_n: int = 0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.emit, self.unit = what, total, emit, unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.every_n, self.clock = every_n, clock
        self.start = self.last = clock()
        self.lines = 0

    def due(self, done: int) -> bool:
        """Whether a line is due after `done` items: every `every_n` items (when set) or `every_s` seconds."""
        if self.every_n and done % self.every_n == 0:
            return True
        return self.clock() - self.last >= self.every_s

    def update(self, done: int, **figures: float | int | str) -> None:
        """Write a line when one is due: items done, the given figures, speed and time left."""
        if self.due(done):
            self.line(done, **figures)

    def line(self, done: int, **figures: float | int | str) -> None:
        """Write a line now."""
        now = self.clock()
        self.last, self.lines = now, self.lines + 1
        parts = [f"{done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%)" if self.total > 0 else
                 f"{done} {self.unit}"]
        parts += [f"{name} {figure(value)}" for name, value in figures.items()]
        elapsed = now - self.start
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s")
            if done < self.total:
                parts.append(f"{duration((self.total - done) / rate)} left")
        self.emit(f"{self.what}: " + ", ".join(parts))
