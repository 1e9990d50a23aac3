"""Opening images as 8-bit RGB, whatever their mode, with errors that name the file and the record.

Beyond `Image.convert("RGB")` (what the official loader does), two cases need care: 16-bit and 32-bit
integer images (PNG/TIFF "I;16", "I"), which `convert` clips at 255 so that they come out nearly white,
are scaled from their 16-bit range instead; and EXIF orientation, which PIL ignores, is applied only on
request (benchmark boxes are annotated on the stored pixels; a phone photo is meant to be seen upright).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from src.errors import UserError

_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageReadError(UserError, OSError):
    """An image that cannot be opened or decoded; the message names the file and the record."""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: wide integer images are scaled from 0..65535 (clipped there), every other mode converted."""
    if image.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":  # float images: taken as 0..255 intensities, clipped
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_image(path: str | Path, where: str, exif_transpose: bool = False) -> Image.Image:
    """Open an image as RGB (upright by its EXIF orientation when asked); errors name the file and `where`.

    Missing, corrupt and truncated files, and files over PIL's decompression-bomb limit (about 179
    megapixels), raise ImageReadError.
    """
    try:
        with Image.open(path) as image:
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"{where}: cannot read image {path}: {err}") from None
