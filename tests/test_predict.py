"""`python -m src.predict`: one picture or a JSONL of queries, with suite and converted official checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from src import predict
from src.config import compose
from src.data.transforms import EvalTransform
from src.run import run
from tests.test_default_job import TINY_JOB


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny default job (LoRA, 2 epochs on a few synthetic scenes)."""
    tmp = tmp_path_factory.mktemp("predict")
    run(compose([f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / 'run'}", *TINY_JOB, "logger=csv",
                 "visualize=0", "shuffled_text_check=false", "peft=lora"]))
    return Path(json.loads((tmp / "run" / "results.json").read_text())["best_checkpoint"])


def photo(path: Path, size: tuple[int, int] = (120, 80)) -> Path:
    Image.new("RGB", size, (30, 120, 200)).save(path)
    return path


def test_canvas_boxes_map_back_to_original_pixels():
    image = Image.new("RGB", (200, 100))
    out = EvalTransform(64)(image, (0, 0, 200, 100), "x")  # long side 200 -> 64: placed 64 x 32, centred
    whole = torch.tensor([0.5, 0.5, 1.0, 0.5])  # the placed image's area on the canvas, cxcywh / S
    assert predict.to_original(whole, out.meta, image.size, 64) == pytest.approx((0, 0, 200, 100), abs=1e-3)
    beyond = torch.tensor([0.5, 0.5, 1.0, 1.0])  # the whole canvas: clipped to the image
    assert predict.to_original(beyond, out.meta, image.size, 64) == pytest.approx((0, 0, 200, 100), abs=1e-3)


@pytest.mark.slow
def test_single_picture_prints_a_box_in_its_pixels_and_draws_it(tiny_checkpoint: Path, tmp_path: Path, capsys,
                                                                monkeypatch):
    image = photo(tmp_path / "street.jpg")
    (tmp_path / "elsewhere").mkdir()
    assert predict.main([f"ckpt={tiny_checkpoint}", f"image={image}", "text=the red circle",
                         f"out={tmp_path / 'drawn.png'}"]) == 0
    x1, y1, x2, y2 = map(float, capsys.readouterr().out.split())
    assert 0 <= x1 <= x2 <= 120 and 0 <= y1 <= y2 <= 80
    assert Image.open(tmp_path / "drawn.png").size == (120, 80)
    monkeypatch.chdir(tmp_path / "elsewhere")  # without out=: named after the picture, in the current folder
    assert predict.main([f"ckpt={tiny_checkpoint}", f"image={image}", "text=the red circle"]) == 0
    assert "drawn on street.prediction.png" in capsys.readouterr().err
    assert Image.open(tmp_path / "elsewhere" / "street.prediction.png").size == (120, 80)


@pytest.mark.slow
def test_jsonl_inputs_are_batched_and_scored_when_a_box_is_given(tiny_checkpoint: Path, tmp_path: Path):
    photo(tmp_path / "a.png", (96, 96)), photo(tmp_path / "b.png", (50, 140))
    lines = [{"box_format": "xywh"}, {"image": "a.png", "phrase": "the blue one"},
             {"image": "b.png", "phrase": "the big square", "bbox": [5, 10, 20, 30]},
             {"image": "a.png", "phrase": "the lowest circle"}]
    inputs = tmp_path / "queries.jsonl"
    inputs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out" / "pred.jsonl"
    assert predict.main([f"ckpt={tiny_checkpoint}", f"inputs={inputs}", f"output={out}", "batch_size=2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["phrase"] for r in rows] == ["the blue one", "the big square", "the lowest circle"]
    assert rows[1]["bbox"] == [5, 10, 25, 40] and 0 <= rows[1]["iou"] <= 1  # xywh declared -> xyxy
    assert "iou" not in rows[0]  # drawings beside the output, named after the picture and the line
    assert [r["png"] for r in rows] == [str(out.parent / "pred_drawn" / n) for n in ("a_1.png", "b_2.png", "a_3.png")]
    assert all(Path(r["png"]).exists() for r in rows) and sorted(p.name for p in out.parent.iterdir()) == [
        "pred.jsonl", "pred_drawn"]
    # the same queries one at a time give the same boxes (batching changes nothing)
    single = predict.Predictor(tiny_checkpoint, "cpu")
    queries = predict.read_queries(inputs, None, "xyxy")
    for q, r in zip(queries, rows, strict=True):
        assert list(single.predict([q])[0].box) == pytest.approx(r["box"], abs=0.01)


def red_columns(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> tuple[int, int]:
    """First and last pixel column of the label's text colour (the predicted box's red), within `box`."""
    pixels = torch.tensor(list(image.crop(box).convert("RGB").getdata())).view(*image.crop(box).size[::-1], 3)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    columns = red.any(0).nonzero().flatten()
    return int(columns[0]), int(columns[-1])


def white_area(image: Image.Image) -> tuple[int, int, int, int]:
    """The label's white background (the picture itself has none): left, top, right, bottom, inclusive."""
    pixels = torch.tensor(list(image.convert("RGB").getdata())).view(image.size[1], image.size[0], 3)
    white = (pixels == 255).all(-1)
    rows, columns = white.any(1).nonzero().flatten(), white.any(0).nonzero().flatten()
    return int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1])


@pytest.mark.parametrize("width", [200, 90])  # the label fits beside the edge / must be wrapped
def test_a_label_at_the_right_edge_stays_inside_the_picture(tmp_path: Path, width: int):
    image = photo(tmp_path / "bridge.png", (width, 120))
    phrase = "Sky above the bridge"
    prediction = predict.Prediction(predict.Query(image, phrase, (width - 30.0, 40, width - 1.0, 100)),
                                    (width - 20.0, 50, width, 110), 0.05)
    with Image.open(predict.draw(prediction, tmp_path / "drawn.png")) as drawn:
        drawn.load()
    left, top, right, bottom = white_area(drawn)
    assert left > 0 and top > 0 and right < width - 1 and bottom < 50  # inside the picture, above the box
    font = predict.label_font((width, 120))
    caption = f"{phrase}  (IoU 0.05)"
    alone = Image.new("RGB", (400, 200), "white")
    ImageDraw.Draw(alone).text((0, 0), caption, fill=(230, 0, 0), font=font)
    first, last = red_columns(drawn, (left, top, right + 1, bottom + 1))
    if width == 200:  # the whole caption on one line, shifted left from the box's corner
        assert last - first == red_columns(alone)[1] - red_columns(alone)[0]
        assert bottom - top + 1 < 2 * font.size
    else:  # wrapped: several lines, none cut
        assert last - first < width and bottom - top + 1 > 2 * font.size
        assert predict.wrap(caption, font, width - 6).count("\n") >= 1


def test_labels_above_the_box_or_inside_it_at_the_top():
    assert predict.label_origin((50, 12), (100, 40, 150, 90), (300, 200), 1) == (100, 27)  # above its corner
    assert predict.label_origin((50, 12), (280, 40, 300, 90), (300, 200), 1) == (249, 27)  # moved left
    assert predict.label_origin((50, 12), (10, 5, 60, 90), (300, 200), 1) == (10, 6)  # no room above: inside
    assert predict.wrap("a verylongword", predict.label_font((100, 100)), 30).split("\n")[0] == "a"


def test_drawings_go_to_one_documented_place():
    assert predict.picture_path(Path("photos/street.jpg"), None) == Path("street.prediction.png")  # current folder
    assert predict.picture_path(Path("photos/street.jpg"), "out/x.png") == Path("out/x.png")
    assert predict.drawings_folder(Path("runs/pred.jsonl"), None) == Path("runs/pred_drawn")
    assert predict.drawings_folder(Path("runs/pred.jsonl"), "pics") == Path("pics")


def test_bad_jsonl_lines_name_the_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "phrase": "x"}\n{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object"):
        predict.read_queries(bad, None, "xyxy")
    with pytest.raises(SystemExit, match="unknown arguments"):
        predict.parse_args(["ckpt=x", "colour=red"])


@pytest.mark.slow
def test_converted_official_checkpoint_predicts_what_the_official_model_computes(tmp_path: Path, shared_dir: Path):
    """A full-size official-mode model written by the converter: the predictor rebuilds it from the file
    alone and gives the boxes of a direct forward pass."""
    from src import convert_official as cli
    from src.models.official import OfficialGeometry, build_official_grounder

    geometry = OfficialGeometry(518, 14, 20, (3, 7, 11), (3, 7, 11))
    torch.manual_seed(0)
    model = build_official_grounder(geometry).eval()
    cli.write_outputs(model, geometry, "in.pth", {}, tmp_path / "official.ckpt", False)
    predictor = predict.Predictor(tmp_path / "official.ckpt", "cpu")
    query = predict.Query(shared_dir / "data" / "photos" / "referit_38100.jpg", "bridge")
    got = predictor.predict([query])[0]
    image = Image.open(query.image).convert("RGB")
    sample = EvalTransform(518)(image, (0, 0, 1, 1), "bridge")
    ids, mask = predictor.bert(["bridge"], 20)
    with torch.no_grad():
        direct = model(sample.image[None], sample.pixel_mask[None], ids, mask).boxes[0]
    assert got.box == pytest.approx(predict.to_original(direct, sample.meta, image.size, 518), abs=1e-3)
