"""The demo page's layout in Gradio: image, phrase and optional true box in, the drawn picture and legend out.

Requests go through Gradio's queue one at a time (the model is shared; the page stays responsive meanwhile);
inputs are handed over raw (`preprocess=False`: Gradio has already moved the upload into its cache) so that
src.demo.answer reads and checks them and every mistake is a message on the page, never a stack trace.
Nothing reaches the internet: analytics off, no share link, the theme's fonts are bundled with Gradio.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import gradio as gr
from PIL import Image

from src.data.benchmarks import BOX_FORMATS
from src.demo.answer import COLOUR_NAMES, LABELS, MAX_MEGAPIXELS, Grounder, answer
from src.demo.examples import Example
from src.errors import ConfigError

IMAGE_HEIGHT = 400  # px on the page for both pictures; small ones (synthetic scenes) are scaled up to fill it
CSS = """.demo-message { color: #b00020; font-weight: 600; }
#demo-legend td, #demo-legend th { padding: 2px 8px; }
#demo-legend td.box { white-space: nowrap; }
#demo-image img, #demo-picture img { width: 100%; height: 100%; object-fit: contain; }"""


def respond(grounders: Sequence[Grounder], max_megapixels: float, upload: dict[str, Any] | None, phrase: str,
            box_text: str, box_format: str) -> tuple[Image.Image | None, str]:
    """The page's handler: (drawn picture or nothing, legend or message)."""
    result = answer(grounders, upload, phrase, box_text, box_format, max_megapixels)
    return result.picture, result.report


def heading(grounders: Sequence[Grounder]) -> str:
    """What the page is and which checkpoints answer, with their colours."""
    names = ", ".join(f"**{label}** `{g.name}` ({g.predictor.method}, {colour})"
                      for label, colour, g in zip(LABELS, COLOUR_NAMES, grounders, strict=False))
    return ("# Referring expression grounding\n"
            f"Drop an image (or click an example), type a phrase naming one object in it, press **Ground**. "
            f"Checkpoints: {names}; a true box, when given, is drawn green and scored by IoU.")


def build_page(grounders: Sequence[Grounder], examples: Sequence[Example],
               max_megapixels: float = MAX_MEGAPIXELS) -> gr.Blocks:
    """The page for loaded checkpoints (one or two) with its examples, its queue set to one request at a time."""
    # uploads and drawn pictures older than an hour leave Gradio's cache (checked hourly): a page left running
    # for days does not fill the disk
    with gr.Blocks(title="Grounding demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(heading(grounders))
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=IMAGE_HEIGHT,
                                 elem_id="demo-image")
                phrase = gr.Textbox(label="Phrase", placeholder="the man on the left", max_lines=1, max_length=300,
                                    elem_id="demo-phrase")
                with gr.Row():
                    box_text = gr.Textbox(label="True box (optional, pixels, for IoU)", placeholder="x1 y1 x2 y2",
                                          max_lines=1, elem_id="demo-true-box", scale=3)
                    box_format = gr.Radio(list(BOX_FORMATS), value="xyxy", label="Box format", scale=2)
                button = gr.Button("Ground", variant="primary", elem_id="demo-ground")
            picture = gr.Image(label="Prediction", type="pil", format="png", interactive=False, height=IMAGE_HEIGHT,
                               elem_id="demo-picture")
        report = gr.HTML(elem_id="demo-report")
        if examples:
            gr.Examples([e.row() for e in examples], [image, phrase, box_text], label="Examples")
        handler = partial(respond, grounders, max_megapixels)
        for trigger in (button.click, phrase.submit):  # one queue for both: one request at a time in all
            trigger(handler, [image, phrase, box_text, box_format], [picture, report], preprocess=False,
                    concurrency_limit=1, concurrency_id="grounding", api_name=False)
    return page.queue(default_concurrency_limit=1)


MAX_FILE_SIZE = "100mb"  # Gradio refuses larger uploads itself, with its own message


def serve(page: gr.Blocks, host: str, port: int) -> None:
    """Serve `page` until interrupted: local only by default, no share link, errors as messages (never Gradio's
    stack traces). Prints `demo page: URL` once it answers; a taken port is a one-line error."""
    try:
        page.launch(server_name=host, server_port=port, share=False, show_error=False, max_file_size=MAX_FILE_SIZE,
                    css=CSS, footer_links=["settings"], quiet=True, prevent_thread_lock=True)
    except OSError as err:
        raise ConfigError(f"cannot serve on {host}:{port} ({err}): pass another port=") from None
    print(f"demo page: http://{host}:{port}  (Ctrl+C stops it)", file=sys.stderr, flush=True)
    page.block_thread()
