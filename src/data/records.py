"""The one record type every reader produces and every dataset consumes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One referring expression: an image file, the referred box and the phrase.

    `image` is the file name as stored in the split (relative to the benchmark's image root);
    `box` is (x1, y1, x2, y2) in pixels of the original image.
    """

    image: str
    box: tuple[float, float, float, float]
    phrase: str
