"""Run a trained grounder on your own pictures: `python -m src.predict ckpt=PATH image=PATH text="..."`.

    python -m src.predict ckpt=best.ckpt image=photo.jpg text="the man on the left" [out=photo.pred.png]
    python -m src.predict ckpt=best.ckpt inputs=queries.jsonl [output=predictions.jsonl] [batch_size=16]

Every prediction is drawn (`draw=false` to skip): one picture goes to `out=` (default: `<image stem>.prediction.png`
in the current folder); the pictures of `inputs=` go to `draw_dir=` (default: `<output stem>_drawn/` beside the
output JSONL), each named `<image stem>_<n>.png` after its image and its line n in the output JSONL.
Options (key=value): `device=auto|cpu|cuda`, `image_root=DIR`
(JSONL image paths are relative to it; default: the JSONL's folder), `box_format=xyxy|xywh` (of optional
`bbox` fields in the JSONL, to report IoU), `on_error=fail|skip` (a query whose image cannot be read or
whose phrase is empty: stop naming it, or write its line with an `error` field and go on),
`exif=true|false` (turn photos upright by their EXIF orientation first, as viewers show them; boxes are
then in upright pixels; default true). The checkpoint brings its model, PEFT method, seed and
tokenizer settings (suite checkpoints and converted official ones); the frozen backbones are rebuilt.
Boxes are printed as x1 y1 x2 y2 in pixels of the original image.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import box_iou

from src.config import compose, resolve_device
from src.data.benchmarks import BOX_FORMATS
from src.data.dataset import clip_to_image
from src.data.images import ImageReadError, load_image
from src.data.problems import BadRecordError, check_policy
from src.data.readers import SplitFileError, jsonl_header_format, jsonl_objects, to_xyxy
from src.data.transforms import CanvasMeta, EvalTransform
from src.errors import reported_errors
from src.pretraining.stages import apply_backbone_pretraining
from src.run import adopt_checkpoint_model, build_seeded_module
from src.storage.checkpoints import load_into, read_checkpoint
from src.storage.trust import check_stored_config
from src.training.lit import GroundingModule

log = logging.getLogger(__name__)


@dataclass
class Query:
    """One image and phrase to ground; `box` (x1y1x2y2 pixels) when the answer is known."""

    image: Path
    phrase: str
    box: tuple[float, float, float, float] | None = None


@dataclass
class Prediction:
    """A predicted x1y1x2y2 box in pixels of the original image and the IoU when the answer was given;
    or, for a query that could not be run (on_error=skip), no box and the `error`."""

    query: Query
    box: tuple[float, float, float, float] | None
    iou: float | None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": str(self.query.image), "phrase": self.query.phrase}
        if self.box is None:
            return out | {"error": self.error}
        out["box"] = [round(v, 2) for v in self.box]
        if self.query.box is not None:
            out |= {"bbox": list(self.query.box), "iou": round(float(self.iou), 4)}
        return out


class Predictor:
    """A checkpoint's grounder with its tokenizers and eval transform, ready for (image, phrase) batches."""

    def __init__(
        self, checkpoint: str | Path, device: str = "auto", on_error: str = "fail", exif_transpose: bool = True
    ) -> None:
        state, stored, prints = read_checkpoint(checkpoint)
        cfg = compose()
        adopt_checkpoint_model(cfg, stored, str(checkpoint))
        adopt_checkpoint_data(cfg, stored, str(checkpoint))
        datamodule = instantiate(cfg.data)
        apply_backbone_pretraining(cfg, datamodule)
        module: GroundingModule = build_seeded_module(cfg)
        load_into(module.model, state, prints, str(checkpoint))
        self.device = resolve_device(device)
        self.model = module.model.to(self.device).eval()
        self.bert, self.clip = datamodule.tokenizers()
        self.image_size = int(cfg.model.image_size)
        self.max_query_len = int(cfg.model.max_query_len)
        self.transform = EvalTransform(self.image_size)
        self.on_error, self.exif_transpose = check_policy(on_error), exif_transpose

    def load(self, query: Query) -> Image.Image:
        """The query's image as the model sees it (RGB, upright when exif_transpose); errors name the query."""
        if not query.phrase.strip():
            raise BadRecordError(f"empty phrase: query ({query.image}, {query.phrase!r}): nothing to ground")
        try:
            return load_image(query.image, f"query ({query.image}, {query.phrase!r})", self.exif_transpose)
        except ImageReadError as err:
            raise BadRecordError(f"unreadable image: {err}") from None

    @torch.no_grad()
    def predict(self, queries: Sequence[Query]) -> list[Prediction]:
        """Ground each query; boxes are mapped back to the original image and clipped to it.

        A query that cannot run raises BadRecordError (on_error="fail") or comes back with its `error`.
        """
        failed: dict[int, str] = {}
        loaded = []
        for i, q in enumerate(queries):
            try:
                loaded.append((q, self.load(q)))
            except BadRecordError as err:
                if self.on_error == "fail":
                    raise
                failed[i] = str(err)
        done = iter(self.ground(loaded) if loaded else [])
        return [Prediction(q, None, None, failed[i]) if i in failed else next(done) for i, q in enumerate(queries)]

    def ground(self, loaded: Sequence[tuple[Query, Image.Image]]) -> list[Prediction]:
        """One batched forward over loaded (query, image) pairs."""
        images, metas, sizes = [], [], []
        queries = [q for q, _ in loaded]
        for q, image in loaded:
            sizes.append(image.size)
            out = self.transform(image, q.box or (0.0, 0.0, 1.0, 1.0), q.phrase)
            images.append(out)
            metas.append(out.meta)
        phrases = [t.phrase for t in images]
        text_ids, text_mask = self.bert(phrases, self.max_query_len)
        prior_ids, prior_mask = self.clip(phrases, self.max_query_len)
        batch = {
            "image": torch.stack([t.image for t in images]), "pixel_mask": torch.stack([t.pixel_mask for t in images]),
            "text_ids": text_ids, "text_mask": text_mask, "prior_ids": prior_ids, "prior_mask": prior_mask,
        }
        boxes = self.model(**{k: v.to(self.device) for k, v in batch.items()}).boxes.float().cpu()
        results = []
        for q, meta, size, box in zip(queries, metas, sizes, boxes, strict=True):
            xyxy = to_original(box, meta, size, self.image_size)
            iou = None
            if q.box is not None:
                iou = float(box_iou(torch.tensor([xyxy]), torch.tensor([q.box], dtype=torch.float32))[0, 0])
            results.append(Prediction(q, xyxy, iou))
        return results


# Where data and caches live on this machine: always the local config's, never a checkpoint's.
LOCAL_DATA_SETTINGS = ("data_root", "split_root", "image_root", "cache_dir")


def adopt_checkpoint_data(cfg: DictConfig, stored: dict, source: str) -> None:
    """The checkpoint's data settings (its tokenizer vocabularies, the synthetic pretraining corpus), checked
    like its model settings; the folders where data and caches live stay this machine's."""
    if not stored.get("data"):
        return
    check_stored_config(stored, ("data",), cfg, source)
    with open_dict(cfg):
        for key, value in stored["data"].items():
            if key not in LOCAL_DATA_SETTINGS:
                cfg.data[key] = value


def to_original(box: torch.Tensor, meta: CanvasMeta, size: tuple[int, int], image_size: int) -> tuple[float, ...]:
    """A (cx, cy, w, h) box in [0, 1] of the canvas -> x1y1x2y2 pixels of the original image, clipped."""
    cx, cy, w, h = (box * image_size).tolist()
    return clip_to_image(meta.to_image_box((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)), size)


PREDICTED, GIVEN, LABEL_BACKGROUND = (230, 0, 0), (0, 200, 0), (255, 255, 255)


def label_font(size: tuple[int, int]) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at a size that reads at the picture's scale (11 px up to ~500 px pictures)."""
    return ImageFont.load_default(size=max(11, round(max(size) / 45)))


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    """`text` broken into lines no wider than `width` px, between words (a longer word is cut where it must be);
    as it is when it fits."""
    if font.getlength(text) <= width:
        return text
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while len(word) > 1 and font.getlength(word) > width:
            cut = next((n for n in range(len(word) - 1, 0, -1) if font.getlength(word[:n]) <= width), 1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    return "\n".join([*lines, line] if line else lines)


def label_origin(
    label: tuple[float, float], box: Sequence[float], size: tuple[int, int], margin: int
) -> tuple[int, int]:
    """Top-left corner of a `label` (width, height) for a box: above its top-left corner, moved left (and down,
    into the box, when there is no room above) as far as needed to stay `margin` px inside the picture."""
    (w, h), (width, height) = label, size
    x = min(max(box[0], margin), width - margin - w)
    y = box[1] - h - 1
    if y < margin:
        y = min(box[1] + 1, height - margin - h)
    return round(max(x, 0)), round(max(y, 0))


def draw(prediction: Prediction, path: Path, exif_transpose: bool = True) -> Path:
    """The original image with the predicted box (red), the given box (green) and the phrase (with the IoU when
    known) on a white label that stays inside the picture: shifted left or down from the box's corner as
    needed, and wrapped when wider than the picture."""
    image = load_image(prediction.query.image, "drawing", exif_transpose)
    pen = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 200))
    if prediction.query.box is not None:
        pen.rectangle(prediction.query.box, outline=GIVEN, width=width)
    pen.rectangle(prediction.box, outline=PREDICTED, width=width)
    caption = prediction.query.phrase + (f"  (IoU {prediction.iou:.2f})" if prediction.iou is not None else "")
    font, pad, margin = label_font(image.size), 2, 1
    text = wrap(caption, font, image.size[0] - 2 * (pad + margin))
    _, _, right, bottom = pen.multiline_textbbox((0, 0), text, font=font)
    x, y = label_origin((right + 2 * pad, bottom + 2 * pad), prediction.box, image.size, margin)
    pen.rectangle((x, y, x + right + 2 * pad - 1, y + bottom + 2 * pad - 1), fill=LABEL_BACKGROUND)
    pen.multiline_text((x + pad, y + pad), text, fill=PREDICTED, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def picture_path(image: Path, out: str | None) -> Path:
    """Where one picture's drawing goes: `out=`, else `<image stem>.prediction.png` in the current folder."""
    return Path(out) if out else Path(f"{image.stem}.prediction.png")


def drawings_folder(output: Path, draw_dir: str | None) -> Path:
    """Where the drawings of `inputs=` go: `draw_dir=`, else `<output stem>_drawn/` beside the output JSONL."""
    return Path(draw_dir) if draw_dir else output.with_name(f"{output.stem}_drawn")


def read_queries(path: Path, image_root: Path | None, box_format: str) -> list[Query]:
    """A JSONL of {"image", "phrase", optional "bbox"} objects (the custom-data format, box optional)."""
    root = image_root or path.parent
    queries = []
    for where, obj in jsonl_objects(path, "inputs file"):
        declared = jsonl_header_format(obj, where) if not queries else None
        if declared is not None:
            box_format = declared
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("phrase"), str):
            raise SplitFileError(f"{where}: expected an object with string fields 'image' and 'phrase'")
        box = None
        if obj.get("bbox") is not None:
            bbox = obj["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
                raise SplitFileError(f"{where}: field 'bbox' must be 4 numbers, got {bbox!r:.80}")
            box = to_xyxy(bbox, box_format)
        queries.append(Query(root / obj["image"], obj["phrase"], box))
    if not queries:
        raise SplitFileError(f"{path}: no queries (expected one JSON object per line)")
    return queries


def batches(items: Sequence[Query], size: int) -> Iterator[Sequence[Query]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    """key=value arguments (the Hydra-like style of the other commands)."""
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise SystemExit(f"arguments are key=value, got {arg!r}\n\n{__doc__}")
        args[key] = value
    known = {"ckpt", "image", "text", "out", "inputs", "output", "batch_size", "device", "draw", "draw_dir",
             "image_root", "box_format", "on_error", "exif"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise SystemExit(f"unknown arguments {unknown}; known: {sorted(known)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.WARNING)
    for stage in ("src.pretraining.vision", "src.pretraining.text"):  # minutes when the pretraining cache is missing
        logging.getLogger(stage).setLevel(logging.INFO)  # their progress lines go to stderr; stdout keeps the boxes
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "ckpt" not in args or not (("image" in args and "text" in args) or "inputs" in args):
        raise SystemExit(__doc__)
    box_format = args.get("box_format", "xyxy")
    if box_format not in BOX_FORMATS:
        raise SystemExit(f"box_format must be one of {BOX_FORMATS}")
    exif = args.get("exif", "true").lower() in ("1", "true", "yes")
    predictor = Predictor(args["ckpt"], args.get("device", "auto"), args.get("on_error", "fail"), exif)
    do_draw = args.get("draw", "true").lower() in ("1", "true", "yes")
    if "inputs" in args:
        root = Path(args["image_root"]) if "image_root" in args else None
        queries = read_queries(Path(args["inputs"]), root, box_format)
        output = Path(args.get("output", Path(args["inputs"]).with_suffix(".predictions.jsonl")))
        output.parent.mkdir(parents=True, exist_ok=True)
        folder = drawings_folder(output, args.get("draw_dir"))
        skipped = 0
        with output.open("w") as f:
            line = 0
            for chunk in batches(queries, int(args.get("batch_size", 16))):
                for p in predictor.predict(chunk):
                    line += 1
                    row = p.as_json()
                    skipped += p.box is None
                    if do_draw and p.box is not None:  # named after the image and the query's line in `output`
                        row["png"] = str(draw(p, folder / f"{p.query.image.stem}_{line}.png", exif))
                    f.write(json.dumps(row) + "\n")
        print(f"{len(queries) - skipped} predictions written to {output}"
              + (f", drawings in {folder}" if do_draw and len(queries) > skipped else ""))
        if skipped:
            print(f"{skipped} queries skipped (on_error=skip): their lines carry the error", file=sys.stderr)
        return 0
    query = Query(Path(args["image"]), args["text"])
    try:
        prediction = predictor.predict([query])[0]
    except BadRecordError as err:
        raise SystemExit(f"error: {err}") from None
    if prediction.box is None:
        raise SystemExit(f"error: {prediction.error}")
    x1, y1, x2, y2 = prediction.box
    print(f"{x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}")
    if do_draw:
        print(f"drawn on {draw(prediction, picture_path(query.image, args.get('out')), exif)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with reported_errors():  # a UserError: one `error: ...` line, exit status 1
        sys.exit(main())
