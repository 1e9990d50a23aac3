"""The grounding demo page: `python -m src.demo ckpt=PATH [ckpt_b=PATH]`, then open http://127.0.0.1:7860.

    python -m src.demo ckpt=best.ckpt                          # one checkpoint: its box in red
    python -m src.demo ckpt=mapper.ckpt ckpt_b=lora.ckpt       # two: A red, B blue, a legend naming their methods

Options (key=value): `port=7860`, `host=127.0.0.1` (0.0.0.0 serves other machines too), `device=auto|cpu|cuda`,
`max_megapixels=50` (larger uploads are refused with a message), `exif=true|false` (turn photos upright by their
EXIF orientation first, as src.predict does). Checkpoints are anything src.predict accepts (suite .ckpt or
.safetensors, converted official checkpoints), loaded once at start: one that cannot load ends the command with
one `error: ...` line. Nothing is sent to the internet (Gradio analytics off, no share link).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from src.demo.answer import LABELS, MAX_MEGAPIXELS, Grounder, short_names
from src.demo.examples import default_examples
from src.demo.page import build_page, serve
from src.errors import ConfigError
from src.predict import flag, parse_args, show_stage_progress

ARGUMENTS = ("ckpt", "ckpt_b", "port", "host", "device", "max_megapixels", "exif")


def positive(args: dict[str, str], key: str, default: float) -> float:
    """A positive number argument; a ConfigError naming it otherwise."""
    value = args.get(key, str(default))
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise ConfigError(f"{key}={value}: expected a positive number")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    """Load the checkpoints, build the page, serve it until interrupted."""
    show_stage_progress()
    args = parse_args(sys.argv[1:] if argv is None else argv, ARGUMENTS, __doc__)
    if "ckpt" not in args:
        raise SystemExit(__doc__)
    port, max_megapixels = positive(args, "port", 7860), positive(args, "max_megapixels", MAX_MEGAPIXELS)
    if port != int(port) or port > 65535:
        raise ConfigError(f"port={args['port']}: expected a whole number from 1 to 65535")
    device, exif = args.get("device", "auto"), flag(args.get("exif", "true"))
    paths = [args[key] for key in ("ckpt", "ckpt_b") if key in args]
    grounders = [Grounder.load(path, name, device, exif) for path, name in zip(paths, short_names(paths), strict=True)]
    for label, g in zip(LABELS, grounders, strict=False):
        print(f"{label}: {g.name}: {g.predictor.method}, {g.tunable:,} tunable backbone parameters "
              f"({g.tunable_pct:.2f} %), on {g.predictor.device}", file=sys.stderr)
    page = build_page(grounders, default_examples(), max_megapixels)
    serve(page, args.get("host", "127.0.0.1"), int(port))
    return 0
