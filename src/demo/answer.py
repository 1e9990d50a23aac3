"""One request of the demo page: an uploaded image, a phrase and an optional true box -> the picture with each
checkpoint's box and a legend (method, tunable parameters, box in pixels, IoU, time), or one message saying
what to fix. No Gradio here: src.demo.page wires these functions to the page, and tests call them directly."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image

from src.data.benchmarks import BOX_FORMATS
from src.data.problems import BadRecordError
from src.data.readers import Box, is_degenerate, to_xyxy
from src.errors import UserError
from src.params import parameter_report
from src.predict import GIVEN, PREDICTED, Colour, Prediction, Predictor, Query, draw_boxes, pixels

COLOURS: tuple[Colour, ...] = (PREDICTED, (0, 90, 230))  # checkpoint A red (as src.predict draws), B blue
COLOUR_NAMES = ("red", "blue")
LABELS = ("A", "B")
MAX_MEGAPIXELS = 50.0  # larger uploads are refused before decoding (a 48 MP phone photo still passes)
SHOWN_SIDE = 1600  # the drawn picture is sent at most this many px a side; the legend stays in original pixels


class PageError(UserError):
    """An input on the page that cannot be grounded; the message says what to do, and the page shows it."""


@dataclass(frozen=True)
class Grounder:
    """A checkpoint loaded once for the page's lifetime, with what its legend row says of it."""

    name: str
    predictor: Predictor
    tunable: int
    tunable_pct: float

    @classmethod
    def load(cls, checkpoint: str | Path, name: str, device: str = "auto", exif_transpose: bool = True) -> Grounder:
        """src.predict's Predictor for `checkpoint` (any checkpoint predict accepts) and its tunable-backbone count,
        counted as the paper counts it (src.params); `name` is what the page calls it."""
        predictor = Predictor(checkpoint, device, "fail", exif_transpose)
        report = parameter_report(predictor.model)
        return cls(name, predictor, int(report["tunable_backbone"]), float(report["tunable_backbone_pct"]))


def short_names(paths: Sequence[str | Path]) -> list[str]:
    """The fewest trailing path parts that tell the checkpoints apart (`best.ckpt`, or `lora/best.ckpt` and
    `mapper/best.ckpt` for two runs' best checkpoints)."""
    parts = [Path(p).parts for p in paths]
    for n in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


@dataclass(frozen=True)
class Grounded:
    """One checkpoint's answer to a request and the seconds its grounding took."""

    grounder: Grounder
    prediction: Prediction
    seconds: float


@dataclass(frozen=True)
class Answer:
    """What the page shows: the drawn picture (None for a message) and the legend or message as HTML."""

    picture: Image.Image | None
    report: str


def uploaded(upload: Mapping[str, Any] | None) -> tuple[Path, str]:
    """The uploaded file (Gradio's file record: `path` in its cache, `orig_name` as the user named it) and the
    name to call it by."""
    if not upload or not upload.get("path"):
        raise PageError("No image: drop a picture on the image box, or click one of the examples, first.")
    path = Path(upload["path"])
    return path, str(upload.get("orig_name") or path.name)


def check_image(path: Path, name: str, max_megapixels: float) -> None:
    """Refuse a file that is no image, or one over `max_megapixels`, from its header alone (nothing decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise PageError(f"{name} is too large (over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels); this page "
                        f"takes up to {max_megapixels:g} megapixels: scale it down first.") from None
    except (OSError, ValueError):
        raise PageError(f"{name} is not an image this page can read: upload a JPEG, PNG, WebP, BMP, GIF or TIFF "
                        "picture.") from None
    if width * height > max_megapixels * 1e6:
        raise PageError(f"{name} is {width}×{height} pixels ({width * height / 1e6:.1f} megapixels), over this "
                        f"page's limit of {max_megapixels:g} megapixels: scale it down first (or start the page "
                        "with a larger max_megapixels=).")


def true_box(text: str | None, box_format: str) -> Box | None:
    """The optional true box typed as 4 numbers (spaces or commas between) in `box_format`, as x1y1x2y2."""
    if not text or not text.strip():
        return None
    if box_format not in BOX_FORMATS:
        raise PageError(f"Box format {box_format!r:.30}: choose one of {', '.join(BOX_FORMATS)}.")
    try:
        numbers = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        numbers = []
    if len(numbers) != 4 or not all(map(math.isfinite, numbers)):
        raise PageError(f"True box {text.strip()!r:.60}: type 4 numbers in pixels ({box_format}), or leave it empty.")
    box = to_xyxy(numbers, box_format)
    if is_degenerate(box):
        raise PageError(f"True box {text.strip()!r:.60}: it has no area ({box_format}: "
                        + ("x2 must exceed x1 and y2 exceed y1)." if box_format == "xyxy" else "w and h must be > 0)."))
    return box


def ground(grounder: Grounder, query: Query, image: Image.Image) -> Grounded:
    """One checkpoint's box for a loaded image (src.predict's forward and mapping to original pixels), timed."""
    start = time.perf_counter()
    (prediction,) = grounder.predictor.ground([(query, image)])
    return Grounded(grounder, prediction, time.perf_counter() - start)


def answer(grounders: Sequence[Grounder], upload: Mapping[str, Any] | None, phrase: str | None, box_text: str | None,
           box_format: str = "xyxy", max_megapixels: float = MAX_MEGAPIXELS) -> Answer:
    """Ground `phrase` in the upload with every checkpoint; any input that cannot be grounded becomes a message."""
    try:
        path, name = uploaded(upload)
        if not phrase or not phrase.strip():
            raise PageError('No phrase: type what to find in the picture, e.g. "the man on the left".')
        given = true_box(box_text, box_format)
        check_image(path, name, max_megapixels)
        query = Query(path, phrase, given)
        start = time.perf_counter()
        try:
            image = grounders[0].predictor.load(query)  # src.predict's reading (RGB, upright by EXIF)
        except BadRecordError:
            raise PageError(f"{name} could not be decoded (a damaged or truncated file?): upload another "
                            "picture.") from None
        read = time.perf_counter() - start
        results = [ground(g, query, image) for g in grounders]
    except PageError as err:
        return Answer(None, message(str(err)))
    report = legend(results, given, name, image.size, read)
    boxes = [(r.prediction.box, colour) for r, colour in zip(results, COLOURS, strict=False)]
    picture = draw_boxes(image, boxes, given)
    picture.thumbnail((SHOWN_SIDE, SHOWN_SIDE))  # in place: the legend above has the original's size
    return Answer(picture, report)


def message(text: str) -> str:
    """A message in place of the legend."""
    return f'<p class="demo-message" role="alert">{escape(text)}</p>'


def swatch(colour: Colour) -> str:
    """A small outlined square in a box's colour, as the legend's key."""
    return (f'<span style="display:inline-block;width:1em;height:0.8em;border:3px solid rgb{colour};'
            'vertical-align:middle"></span>')


def legend(results: Sequence[Grounded], given: Box | None, name: str, size: tuple[int, int], read: float) -> str:
    """The table under the picture: per checkpoint its colour, file, method, tunable-backbone parameters, box
    (x1 y1 x2 y2 pixels of the original image), IoU with the true box and grounding time; then the true box."""
    head = ("<tr><th></th><th>checkpoint</th><th>method</th><th>tunable backbone parameters</th>"
            "<th>box x1 y1 x2 y2 (px)</th><th>IoU</th><th>time</th></tr>")
    rows = []
    for label, colour, r in zip(LABELS, COLOURS, results, strict=False):
        g, p = r.grounder, r.prediction
        iou = "–" if p.iou is None else f"{p.iou:.3f}"
        rows.append(
            f'<tr class="checkpoint"><td>{swatch(colour)}</td><td>{label}: {escape(g.name)}</td>'
            f'<td class="method">{escape(g.predictor.method)}</td>'
            f'<td class="tunable">{g.tunable:,} ({g.tunable_pct:.2f} %)</td>'
            f'<td class="box">{pixels(p.box)}</td><td class="iou">{iou}</td>'
            f'<td class="time">{1000 * r.seconds:.0f} ms</td></tr>')
    if given is not None:
        rows.append(f'<tr class="given"><td>{swatch(GIVEN)}</td><td>true box</td><td></td><td></td>'
                    f'<td class="box">{pixels(given)}</td><td></td><td></td></tr>')
    note = (f"<p>{escape(name)}: {size[0]}×{size[1]} px, read in {1000 * read:.0f} ms. Boxes are in its pixels; "
            "time is each checkpoint's tokenising, forward pass and mapping back.</p>")
    return f'<table id="demo-legend">{head}{"".join(rows)}</table>{note}'

