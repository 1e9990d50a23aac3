"""The demo page in a real browser: headless Chromium (Debian's package, which `make setup` installs) driven by
playwright, against `python -m src.demo` serving a checkpoint trained for a few steps and a second one.

Checked: a photo uploaded and a phrase typed give each checkpoint's box drawn and the coordinates src.predict prints
for the same inputs; every bad input is a message on the page; a checkpoint that cannot load is one error line;
requests run one at a time while the page keeps answering; the page asks nothing of the internet. A screenshot of
the answered page is kept under $REC_TEST_ARTEFACTS when set (else in the test's temporary folder).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from src import predict
from src.config import compose
from src.demo.answer import COLOURS, Grounder
from src.demo.page import build_page
from src.run import run
from src.storage.checkpoints import export_safetensors
from tests.conftest import PROJECT_ROOT, SHARED
from tests.test_default_job import TINY_JOB
from tests.test_demo import outline, picture, untrained_checkpoint

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# This machine's network is closed and its sandboxing unavailable: no sandbox, GPU, QUIC or background traffic.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTEFACTS_ENV = "REC_TEST_ARTEFACTS"
PHRASE = "the red circle"


# The browser comes first in each test's fixtures: without it, a test skips before training anything.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A fresh headless Chromium profile; skips (saying why) only where Chromium or playwright is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: `make setup` installs Debian's chromium package with apt-get, which "
                    "needs root or password-less sudo and a Debian mirror (set CHROMIUM= to use another binary)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: `make setup` installs it")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS,
            headless=True, viewport={"width": 1280, "height": 1000})
        outside: list[str] = []  # every request the page makes beyond this machine's server
        context.on("request", lambda r: outside.append(r.url) if not r.url.startswith("http://127.0.0.1") else None)
        yield context
        context.close()
        assert not [u for u in outside if not u.startswith(("data:", "blob:"))], "the page reached out: " + str(outside)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A: the tiny default job with LoRA, trained for a few steps (.ckpt); B: a MaPPER checkpoint (.safetensors)."""
    tmp = tmp_path_factory.mktemp("demo-browser")
    run(compose([f"paths.output_dir={tmp / 'run'}", *TINY_JOB, "logger=csv", "visualize=0",
                 "shuffled_text_check=false", "peft=lora"]))
    trained = Path(json.loads((tmp / "run" / "results.json").read_text())["best_checkpoint"])
    mapper = export_safetensors(untrained_checkpoint("mapper", tmp / "mapper.ckpt"), tmp / "mapper.safetensors")
    return trained, mapper


@pytest.fixture(scope="module")
def served(checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m src.demo` with both checkpoints on a free port; its URL once it says it is serving."""
    port, tmp = free_port(), tmp_path_factory.mktemp("gradio")
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp)}
    cmd = [sys.executable, "-m", "src.demo", f"ckpt={checkpoints[0]}", f"ckpt_b={checkpoints[1]}", f"port={port}",
           "device=cpu"]
    server = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in server.stderr:
            lines.append(line)
            if line.startswith("demo page: "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(600) or server.poll() is not None:
            pytest.fail("the demo did not start:\n" + "".join(lines[-30:]))
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real photo from ../shared when present, else a drawn picture."""
    shared = SHARED / "data" / "photos" / "referit_38100.jpg"
    return shared if shared.is_file() else picture(tmp_path_factory.mktemp("photo") / "scene.png")


def artefact(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get(ARTEFACTS_ENV) or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def open_page(browser, url: str):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#demo-ground", timeout=60_000)
    return page


def ground(page, text: str | None = None, box: str | None = None) -> None:
    """Type the phrase (and true box) when given, press Ground."""
    if text is not None:
        page.locator("#demo-phrase textarea, #demo-phrase input").fill(text)
    if box is not None:
        page.locator("#demo-true-box textarea, #demo-true-box input").fill(box)
    page.click("#demo-ground")


def test_a_photo_and_phrase_give_predicts_boxes_drawn(browser, served: str, checkpoints, photo: Path, tmp_path: Path,
                                                     capsys):
    from playwright.sync_api import expect

    page = open_page(browser, served)
    page.set_input_files("#demo-image input[type=file]", str(photo))
    ground(page, PHRASE)
    expect(page.locator("#demo-legend")).to_be_visible(timeout=60_000)
    shown = page.locator("#demo-legend tr.checkpoint td.box").all_inner_texts()
    methods = page.locator("#demo-legend tr.checkpoint td.method").all_inner_texts()
    page.screenshot(path=artefact(tmp_path, "demo-page.png"), full_page=True)
    expected = []
    for checkpoint in checkpoints:  # the command line's answer for the same inputs
        assert predict.main([f"ckpt={checkpoint}", f"image={photo}", f"text={PHRASE}", "draw=false"]) == 0
        expected.append(capsys.readouterr().out.strip())
    assert shown == expected and methods == ["lora", "mapper"]
    src = page.locator("#demo-picture img").get_attribute("src")
    with urllib.request.urlopen(src if src.startswith("http") else served.rstrip("/") + src) as response:
        drawn = Image.open(io.BytesIO(response.read())).convert("RGB")
    with Image.open(photo) as original:
        assert drawn.size == original.size
    for box, colour in zip(shown, COLOURS, strict=True):
        x1, y1, x2, y2 = map(float, box.split())
        assert outline(drawn, (x1, y1, x2, y2)).count(colour) > 2 * (x2 - x1 + y2 - y1)
    page.close()


def test_bad_inputs_are_messages_on_the_page(browser, served: str, photo: Path, tmp_path: Path):
    from playwright.sync_api import expect

    page = open_page(browser, served)
    report = page.locator("#demo-report")
    upload = page.locator("#demo-image input[type=file]")
    ground(page, PHRASE)
    expect(report).to_contain_text("No image: drop a picture", timeout=30_000)
    (tmp_path / "notes.txt").write_text("not a picture")
    upload.set_input_files(str(tmp_path / "notes.txt"))  # refused by the page itself, by its type
    expect(page.get_by_text("Invalid file type: notes.txt")).to_be_visible(timeout=30_000)
    (tmp_path / "fake.jpg").write_text("not a picture either")
    Image.new("1", (8000, 7000), 1).save(tmp_path / "huge.png")
    for name, said in (("fake.jpg", "fake.jpg is not an image this page can read"),
                       ("huge.png", "huge.png is 8000×7000 pixels (56.0 megapixels), over this page's limit")):
        upload.set_input_files(str(tmp_path / name))
        ground(page)
        expect(report).to_contain_text(said, timeout=30_000)
        page.get_by_label("Remove Image").click()
    upload.set_input_files(str(photo))
    ground(page, "  ")
    expect(report).to_contain_text("No phrase: type what to find", timeout=30_000)
    ground(page, PHRASE, "1 2 3")
    expect(report).to_contain_text("True box '1 2 3': type 4 numbers", timeout=30_000)
    ground(page, PHRASE, "0 0 100 100")  # and the page still answers
    expect(page.locator("#demo-legend tr.given td.box")).to_have_text("0.0 0.0 100.0 100.0", timeout=30_000)
    page.screenshot(path=artefact(tmp_path, "demo-page-after-bad-inputs.png"), full_page=True)
    assert "Traceback" not in page.content()
    page.close()


def test_a_checkpoint_that_cannot_load_is_one_error_line(tmp_path: Path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "src.demo", f"ckpt={tmp_path / 'junk.ckpt'}"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'junk.ckpt'}: refused to load")


def test_one_request_at_a_time_while_the_page_keeps_answering(browser, checkpoints, photo: Path, tmp_path: Path,
                                                               monkeypatch):
    """Two pages ask at once while the first request is held: the server still serves the page, and the second
    request starts only when the first has finished."""
    from playwright.sync_api import expect

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))  # where Gradio keeps the uploads

    grounder = Grounder.load(checkpoints[1], "mapper.safetensors", "cpu")
    release, running, most = threading.Event(), [0], [0]
    forward = grounder.predictor.ground

    def held(loaded):
        running[0] += 1
        most[0] = max(most[0], running[0])
        release.wait(120)
        try:
            return forward(loaded)
        finally:
            running[0] -= 1

    grounder.predictor.ground = held
    port = free_port()
    app = build_page([grounder], [])
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        pages = [open_page(browser, f"http://127.0.0.1:{port}/") for _ in range(2)]
        for page in pages:
            page.set_input_files("#demo-image input[type=file]", str(photo))
            ground(page, PHRASE)
        deadline = time.monotonic() + 60
        while running[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200 and time.monotonic() - start < 5  # served while a request runs
        time.sleep(1)
        assert running[0] == 1  # the second request waits in the queue
        release.set()
        for page in pages:
            expect(page.locator("#demo-legend")).to_be_visible(timeout=60_000)
            page.close()
        assert most[0] == 1
    finally:
        release.set()
        app.close()
