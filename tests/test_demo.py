"""The demo page's requests without a browser: boxes and legend as src.predict gives them, every bad input a message,
the examples, and the command's one-line errors. tests/test_demo_browser.py drives the served page."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from src import predict
from src.config import compose
from src.demo import examples, serve
from src.demo.answer import COLOURS, MAX_MEGAPIXELS, SHOWN_SIDE, Answer, Grounder, answer, short_names
from src.demo.page import build_page, respond
from src.errors import reported_errors
from src.run import build_seeded_module
from tests.test_checkpoints import pretend_training, save


def untrained_checkpoint(peft: str, path: Path) -> Path:
    """A default-model checkpoint of `peft` with its trainable weights moved off their initial values (no training,
    no pretraining stages: seconds), as src.predict and the page load any checkpoint."""
    cfg = compose([f"peft={peft}", "vision_pretraining=null", "text_pretraining=null"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(path.parent)
    module = build_seeded_module(cfg)
    pretend_training(module)
    return save(module, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("demo")
    return {peft: untrained_checkpoint(peft, tmp / f"{peft}.ckpt") for peft in ("lora", "mapper")}


@pytest.fixture(scope="module")
def grounders(checkpoints: dict[str, Path]) -> list[Grounder]:
    return [Grounder.load(path, path.name, "cpu") for path in checkpoints.values()]


def upload(path: Path) -> dict[str, str]:
    """Gradio's record of an uploaded file, as the page's handler receives it."""
    return {"path": str(path), "orig_name": path.name}


def picture(path: Path, size: tuple[int, int] = (160, 120)) -> Path:
    image = Image.new("RGB", size, (40, 90, 160))
    image.paste((220, 200, 40), (30, 20, 90, 80))
    image.save(path)
    return path


def test_each_checkpoint_box_is_predicts_drawn_in_its_colour(grounders: list[Grounder], checkpoints, tmp_path: Path):
    image = picture(tmp_path / "scene.png")
    got = answer(grounders, upload(image), "the yellow square", "30 20 60 60", "xywh")
    assert got.picture is not None and got.picture.size == (160, 120)
    for path, colour in zip(checkpoints.values(), COLOURS, strict=True):
        query = predict.Query(image, "the yellow square", (30, 20, 90, 80))
        expected = predict.Predictor(path, "cpu").predict([query])[0]
        row = got.report.split(f"{path.name}</td>")[1].split("</tr>")[0]
        assert f'<td class="box">{predict.pixels(expected.box)}</td>' in row
        assert f'<td class="iou">{expected.iou:.3f}</td>' in row  # the true box, typed as xywh, read as xyxy
        x1, y1, x2, y2 = expected.box
        assert outline(got.picture, expected.box).count(colour) > 2 * (x2 - x1 + y2 - y1)  # most of its 2 px line
    assert "<td>true box</td>" in got.report and "30.0 20.0 90.0 80.0" in got.report
    assert "lora.ckpt" in got.report and "lora" in got.report and "mapper" in got.report
    assert f"{grounders[1].tunable:,} ({grounders[1].tunable_pct:.2f} %)" in got.report and " ms</td>" in got.report


def outline(image: Image.Image, box: tuple[float, ...], band: int = 2) -> list[tuple[int, int, int]]:
    """The colours of the pixels within `band` px of a box's sides (where its line is drawn)."""
    pixels, (width, height) = image.load(), image.size
    x1, y1, x2, y2 = box
    return [pixels[x, y] for x in range(width) for y in range(height)
            if x1 - band <= x <= x2 + band and y1 - band <= y <= y2 + band
            and min(abs(x - x1), abs(x - x2), abs(y - y1), abs(y - y2)) <= band]


def test_a_large_picture_is_shown_smaller_with_its_boxes_in_original_pixels(grounders: list[Grounder],
                                                                          tmp_path: Path):
    image = picture(tmp_path / "large.png", (2400, 1800))
    got = answer(grounders[:1], upload(image), "the yellow square", "")
    expected = grounders[0].predictor.predict([predict.Query(image, "the yellow square")])[0]
    assert got.picture.size == (SHOWN_SIDE, 1200) and "large.png: 2400×1800 px" in got.report
    assert f'<td class="box">{predict.pixels(expected.box)}</td>' in got.report


def message(got: Answer) -> str:
    """The message shown instead of a picture and legend, as the page reads."""
    assert got.picture is None and got.report.startswith('<p class="demo-message"')
    return html.unescape(got.report)


def test_bad_inputs_are_messages_on_the_page(grounders: list[Grounder], tmp_path: Path):
    image = picture(tmp_path / "scene.png")
    assert "No image" in message(answer(grounders, None, "the dog", ""))
    assert "No phrase" in message(answer(grounders, upload(image), "   ", ""))
    (tmp_path / "notes.jpg").write_text("not a picture")
    assert "notes.jpg is not an image this page can read" in message(answer(grounders, upload(tmp_path / "notes.jpg"),
                                                                            "the dog", ""))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image.read_bytes()[:120])
    assert "cut.png could not be decoded" in message(answer(grounders, upload(truncated), "the dog", ""))
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 7000), 1).save(huge)  # 56 megapixels in 20 kB: refused from its header, never decoded
    assert f"8000×7000 pixels (56.0 megapixels), over this page's limit of {MAX_MEGAPIXELS:g}" in message(
        answer(grounders, upload(huge), "the dog", ""))
    assert "over this page's limit of 0.01" in message(answer(grounders, upload(image), "the dog", "", "xyxy", 0.01))
    for box, problem in (("1 2 3", "type 4 numbers"), ("a b c d", "type 4 numbers"), ("1 2 3 nan", "type 4 numbers"),
                         ("10 10 5 40", "it has no area")):
        assert problem in message(answer(grounders, upload(image), "the dog", box))
    assert "Box format" in message(answer(grounders, upload(image), "the dog", "1 2 3 4", "cxcywh"))
    assert "&lt;b&gt;" in answer(grounders, upload(image), "the dog", "<b>").report  # what users type is escaped


def test_examples_are_the_photos_or_the_benchmarks_first_test_scenes(tmp_path: Path):
    few, more = examples.synthetic_examples(1), examples.synthetic_examples(2)
    def seen(found: list[examples.Example]) -> list[tuple[str, str, tuple[float, ...]]]:
        return [(e.image.name, e.phrase, e.box) for e in found]

    assert len(few) == 2 and seen(more[:2]) == seen(few)  # the generator's test stream: the benchmark's first scenes
    for e in more:
        with Image.open(e.image) as image:
            assert 0 <= e.box[0] < e.box[2] <= image.width and 0 <= e.box[1] < e.box[3] <= image.height
    assert more[0].row() == [str(more[0].image), more[0].phrase, " ".join(f"{v:g}" for v in more[0].box)]
    picture(tmp_path / "a.jpg")
    records = [["a.jpg", "1", [1, 2, 30, 40], "the car", "test"], ["a.jpg", "2", "not a box", "x", "test"],
               ["missing.jpg", "3", [1, 2, 3, 4], "y", "test"], "junk"]
    (tmp_path / "annotations.json").write_text(json.dumps({"records": records}))
    assert examples.photo_examples(tmp_path) == [examples.Example(tmp_path / "a.jpg", "the car", (1, 2, 30, 40))]
    (tmp_path / "annotations.json").write_text("{")
    assert examples.photo_examples(tmp_path) == []


def test_shared_photos_are_the_examples_when_present(shared_dir: Path):
    found = examples.default_examples()
    assert len(found) == 7 and {e.image.name for e in found} == {"referit_38100.jpg", "referit_40429.jpg"}


def test_synthetic_scenes_are_the_examples_without_the_photos(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(examples, "SHARED_PHOTOS", tmp_path / "absent")  # a user's clone: no ../shared
    assert examples.default_examples() == examples.synthetic_examples(examples.SYNTHETIC_SCENES)


def test_the_page_sends_no_analytics_and_queues_every_request_together(grounders: list[Grounder], tmp_path: Path,
                                                                       monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # where Gradio copies the examples
    page = build_page(grounders, examples.synthetic_examples(1))
    handlers = [fn for fn in page.fns.values() if getattr(fn.fn, "func", None) is respond]
    assert page.analytics_enabled is False and len(handlers) == 2  # the button and Enter in the phrase box
    assert {(fn.concurrency_limit, fn.concurrency_id, fn.preprocess) for fn in handlers} == {(1, "grounding", False)}


def test_checkpoint_names_are_told_apart():
    assert short_names(["runs/a/best.ckpt"]) == ["best.ckpt"]
    assert short_names(["r/lora/checkpoints/best.ckpt", "r/mapper/checkpoints/best.ckpt"]) == [
        "lora/checkpoints/best.ckpt", "mapper/checkpoints/best.ckpt"]


@pytest.mark.parametrize("argv, expected", [
    (["ckpt={tmp}/missing.ckpt"], "error: checkpoint not found: {tmp}/missing.ckpt"),
    (["ckpt={tmp}/junk.ckpt"], "error: {tmp}/junk.ckpt: refused to load"),
    (["ckpt=x.ckpt", "port=http"], "error: port=http: expected a positive number"),
    (["ckpt=x.ckpt", "max_megapixels=0"], "error: max_megapixels=0: expected a positive number"),
])
def test_a_command_line_mistake_is_one_error_line(argv: list[str], expected: str, tmp_path: Path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as ended, reported_errors():
        serve.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert ended.value.code == 1 and err.startswith(expected.format(tmp=tmp_path)) and "\n" not in err
    with pytest.raises(SystemExit, match="unknown arguments"):
        serve.main(["ckpt=x.ckpt", "colour=red"])


@pytest.mark.slow
def test_a_converted_official_checkpoint_answers_on_the_page(tmp_path: Path, shared_dir: Path):
    """The full-size official-mode model the converter writes: the page's box is src.predict's."""
    from src import convert_official as cli
    from src.models.official import OfficialGeometry, build_official_grounder

    geometry = OfficialGeometry(518, 14, 20, (3, 7, 11), (3, 7, 11))
    torch.manual_seed(0)
    cli.write_outputs(build_official_grounder(geometry).eval(), geometry, "in.pth", {}, tmp_path / "official.ckpt",
                      False)
    grounder = Grounder.load(tmp_path / "official.ckpt", "official.ckpt", "cpu")
    photo = shared_dir / "data" / "photos" / "referit_38100.jpg"
    got = answer([grounder], upload(photo), "bridge", "")
    expected = grounder.predictor.predict([predict.Query(photo, "bridge")])[0]
    assert f'<td class="box">{predict.pixels(expected.box)}</td>' in got.report and got.picture.size == (480, 360)
    assert grounder.tunable > 0 and 1.0 < grounder.tunable_pct < 2.0  # MaPPER: about 1.41 % of the backbones
