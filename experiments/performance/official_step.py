"""Training-step and evaluation cost of the *official* MaPPER code on CPU, measured like `python -m src.bench`.

    python experiments/performance/official_step.py --official-root /tmp/official_bench/MaPPER
    python experiments/performance/official_step.py --official-root PATH --steps 5 --warmup 1 --threads 2 \\
        --out experiments/performance/official_step_cpu.json
    python experiments/performance/official_step.py --official-root PATH --check   # build + one eval forward

The official implementation (liuting20/MaPPER) is imported, unmodified, from `--official-root` (a checkout
of that repository: it must contain `models/`, `utils/`, `train.py` and `configs/`). Nothing of it is
copied here. The model is built the way the official `train.py` builds it: `models.build_model(args,
config)` with the defaults of the official `get_args_parser()` (518 px, max_query_len 20, VL encoder
6 x 256-d / 8 heads / FFN 2048, `bert-base-uncased`, ...) and `configs/adapter.yaml` (`adapter: True`);
`torch.manual_seed(13)` before building (seed 13 + rank 0). Weights are RANDOM: no checkpoint exists
offline, and timing does not depend on the values. Then `train.py`'s freezing rules (trainable: LoCA
`adapter`/`vis_downsample` in `visumodel`, DyPA `dapt`/`adapter` in `textmodel`, all of `text_adapter`,
`adapter` in `textmodel_clip`, plus everything outside those four modules) and its four AdamW parameter
groups (lr 1e-4 / 1e-5 / 1e-5 / 1e-5, weight decay 1e-4).

Protocol (the same as `src/bench.py`): fp32, `torch.set_num_threads(--threads)` (2 by default), batch
`--batch` (2), a random 518 x 518 image tensor with an all-valid pixel mask (int, 1 = padding, as the
official collate builds it), random token ids in [1000, 20000) with the second half of the 20 positions
padded (id 0, mask 0). The same ids go to BERT and to the CLIP prior, as in the official `MaPPER.forward`.
Targets are random (cx, cy, w, h) boxes in [0.3, 0.7]. Training step = `model.train()` forward + the
official loss (`utils.loss_utils.trans_vg_loss`: L1 + GIoU, summed as in `engine.train_one_epoch`) +
backward + `AdamW.step()` + `zero_grad(set_to_none=True)`. Evaluation = `model.eval()` forward under
`torch.no_grad()`. `--warmup` untimed steps, then `--steps` timed steps of each; median, min and spread
(max - min) of each, and the peak RSS of each timed phase (`/proc/self/clear_refs` <- "5" resets the
high-water mark, then `VmHWM` from `/proc/self/status`, as `src/analysis/table.py` does). The official training
wraps the forward in `torch.cuda.amp.autocast()` + `GradScaler`; on CPU that autocast is inactive, so fp32
is what the official code runs there too. Prints one JSON line at the end; `--out` also writes it.

Shims (everything the official code needs to import and build offline under this environment:
torch 2.x, transformers 5.x, timm 1.x). No official file is edited; all shims live in this process.

1. Stub modules, written at run time into `--stubs-dir` (default: a temporary directory) and appended to
   `sys.path` (so installed packages win), each only if the real module is not importable:
   * `pytorch_pretrained_bert.modeling.BertModel`: imported by `models/mapper_vg.py` but never used there
     (the model's BERT is `models/language_model/med.py`). The stub class raises if instantiated.
   * `einops` (`rearrange`, `reduce`, `repeat`): imported by `med.py` but never called. Stubs raise if called.
   * `pkg_resources` (exposes `packaging`): `models/clip/clip.py` does `from pkg_resources import
     packaging` for a torch version comparison; this setuptools (84) no longer ships `pkg_resources`.
   * `ftfy` (`fix_text` = identity): imported by the CLIP tokenizer, which the model never calls.
2. transformers 5 compatibility, injected before `med.py` is imported / used:
   * `transformers.modeling_utils.apply_chunking_to_forward`, `prune_linear_layer` (moved to
     `transformers.pytorch_utils`) and `find_pruneable_heads_and_indices` (removed in v5; a stub that
     refuses to run: MaPPER never prunes heads). Only `apply_chunking_to_forward` is called (with chunk
     size 0 = a plain call).
   * `med.BertPreTrainedModel.init_weights` (only with transformers >= 5): the official `BertModel.__init__`
     calls the legacy `self.init_weights()`, which in v5 needs attributes that `post_init()` sets
     (`all_tied_weights_keys`); the shim runs `post_init()` first, which then calls the stock
     `init_weights()` (the official `_init_weights` on every module, then weight tying, of which there is
     none). Same result as v4's `init_weights()`.
   * `PreTrainedModel.get_head_mask` and `invert_attention_mask` (removed in v5) are set on the official
     `med.BertPreTrainedModel` class, with the v4 behaviour. With `head_mask=None`, as MaPPER calls it,
     `get_head_mask` returns `[None] * num_hidden_layers`; `invert_attention_mask` is only reached with
     cross-attention inputs, which MaPPER never passes.
3. Pretrained-weight loading skipped (random init kept):
   * `med.BertModel.from_pretrained(path, config=..., **kw)` (path is the authors' cluster directory) is
     replaced by a classmethod that returns `cls(config, **kw)`: the same architecture
     (`configs/med_config.json`, no pooler, DyPA in layers 3/7/11) with the official `_init_weights` init.
   * `models.clip.clip.load("ViT-B/16", device)` (downloads OpenAI's file) is replaced by a function that
     builds the official `models.clip.model.ModifiedCLIP` with the ViT-B/16 hyper-parameters that
     `build_model` would infer from that file (embed 512; vision 224 px, 12 layers, width 768, patch 16;
     text context 77, vocab 49408, width 512, 8 heads, 12 layers), runs the official `convert_weights`
     (fp16) and then `.float()` as `load` does on CPU, and returns `(model.eval(), None)`.
   * The DINOv2 checkpoint is never loaded: `train.py` loads it only after `build_model`, from
     `--foundation_model_path`, which is None by default.
   Check (done once, not part of this script): with these shims the official model's `state_dict` has the
   same 991 keys, order and shapes as `shared/parity/official_mapper_manifest.json`; loaded with the
   `case_01` recipe weights it reproduces `case_01`'s boxes (recorded with transformers 4.39.3) to 6e-8.
   Trainable parameters: 11,547,167, as the official `train.py` prints. transformers 5 logs one harmless
   deprecation line (`past_key_values` in `BaseModelOutputWithPastAndCrossAttentions`).
4. Environment, not code: `HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1`; the working directory is the
   official root while the model is built (`models/language_model/bert.py` opens the relative path
   `configs/med_config.json`); `get_args_parser` is read out of `train.py` with `ast` and executed on its
   own, because importing `train.py` would pull in its data pipeline, `ipdb` and `ruamel.yaml`;
   `configs/adapter.yaml` is read with PyYAML.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

STUBS: dict[str, dict[str, str]] = {
    "pytorch_pretrained_bert": {
        "__init__.py": '"""Stub: only `pytorch_pretrained_bert.modeling.BertModel` is imported (and unused)."""\n',
        "modeling.py": (
            '"""Stub of pytorch_pretrained_bert.modeling: MaPPER imports BertModel but never uses it."""\n\n\n'
            "class BertModel:\n"
            "    def __init__(self, *args, **kwargs):\n"
            '        raise RuntimeError("pytorch_pretrained_bert stub: BertModel is not available")\n'
        ),
    },
    "einops": {
        "__init__.py": (
            '"""Stub of einops: med.py imports rearrange/reduce/repeat but never calls them."""\n\n\n'
            "def _unavailable(*args, **kwargs):\n"
            '    raise RuntimeError("einops stub: not available")\n\n\n'
            "rearrange = reduce = repeat = _unavailable\n"
        ),
    },
    "pkg_resources": {
        "__init__.py": (
            '"""Stub of pkg_resources: clip.py only uses `packaging`."""\n\n'
            "import packaging.version  # noqa: F401\n"
        ),
    },
    "ftfy": {
        "__init__.py": '"""Stub of ftfy: the CLIP tokenizer is never called."""\n\n\n'
        "def fix_text(text, *args, **kwargs):\n    return text\n",
    },
}


def write_stubs(folder: Path) -> list[str]:
    """Write the stub packages that are not importable here into `folder`; the names written."""
    written = []
    for package, files in STUBS.items():
        if importlib.util.find_spec(package) is not None:
            continue
        (folder / package).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / package / name).write_text(text)
        written.append(package)
    return written


def official_args_parser(official_root: Path) -> argparse.ArgumentParser:
    """The official `get_args_parser()` from `train.py`, executed alone (its imports need only argparse)."""
    tree = ast.parse((official_root / "train.py").read_text())
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser"]
    if not funcs:
        raise SystemExit(f"{official_root / 'train.py'} has no get_args_parser()")
    namespace: dict[str, Any] = {"argparse": argparse}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), str(official_root / "train.py"), "exec"), namespace)
    return argparse.ArgumentParser("official MaPPER", parents=[namespace["get_args_parser"]()])


def read_config(official_root: Path) -> dict[str, Any]:
    """`configs/adapter.yaml` (the official default `--config`)."""
    import yaml

    return dict(yaml.safe_load((official_root / "configs" / "adapter.yaml").read_text()) or {})


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the block with `path` as the working directory."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def install_transformers_shims() -> list[str]:
    """Put the helpers removed from `transformers.modeling_utils` in v5 back; the names injected."""
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    def find_pruneable_heads_and_indices(*_args: Any, **_kwargs: Any) -> Any:
        """Imported by med.py for head pruning, which MaPPER never does: refuses if it is ever called."""
        raise NotImplementedError("head pruning is not supported by this measurement harness")

    injected = []
    replacements = {"apply_chunking_to_forward": getattr(pytorch_utils, "apply_chunking_to_forward", None),
                    "prune_linear_layer": getattr(pytorch_utils, "prune_linear_layer", None),
                    "find_pruneable_heads_and_indices": getattr(pytorch_utils, "find_pruneable_heads_and_indices",
                                                                find_pruneable_heads_and_indices)}
    for name, value in replacements.items():
        if not hasattr(modeling_utils, name):
            if value is None:
                raise SystemExit(f"transformers has no {name} to shim")
            setattr(modeling_utils, name, value)
            injected.append(f"transformers.modeling_utils.{name}")
    return injected


def install_model_shims() -> list[str]:
    """Shims on the imported official modules: BERT/CLIP weight loading skipped, v4 PreTrainedModel methods."""
    import torch
    import transformers
    from models.clip import clip as official_clip
    from models.clip import model as clip_model
    from models.language_model import med

    shims = []

    def get_head_mask(self: Any, head_mask: Any, num_hidden_layers: int, is_attention_chunked: bool = False) -> Any:
        """transformers 4.x `PreTrainedModel.get_head_mask`."""
        if head_mask is None:
            return [None] * num_hidden_layers
        if head_mask.dim() == 1:
            head_mask = head_mask.unsqueeze(0).unsqueeze(0).unsqueeze(-1).unsqueeze(-1)
            head_mask = head_mask.expand(num_hidden_layers, -1, -1, -1, -1)
        elif head_mask.dim() == 2:
            head_mask = head_mask.unsqueeze(1).unsqueeze(-1).unsqueeze(-1)
        head_mask = head_mask.to(dtype=self.dtype)
        if is_attention_chunked:
            head_mask = head_mask.unsqueeze(-1)
        return head_mask

    def invert_attention_mask(self: Any, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        """transformers 4.x `ModuleUtilsMixin.invert_attention_mask`."""
        if encoder_attention_mask.dim() == 3:
            extended = encoder_attention_mask[:, None, :, :]
        else:
            extended = encoder_attention_mask[:, None, None, :]
        extended = extended.to(dtype=self.dtype)
        return (1.0 - extended) * torch.finfo(self.dtype).min

    base_init_weights = transformers.PreTrainedModel.init_weights

    def init_weights(self: Any) -> None:
        """v4-style `init_weights()` called from `__init__`: v5 first needs `post_init`'s bookkeeping."""
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()  # sets all_tied_weights_keys etc., then calls init_weights() again
        else:
            base_init_weights(self)

    if int(transformers.__version__.split(".")[0]) >= 5:
        med.BertPreTrainedModel.init_weights = init_weights
        shims.append("med.BertPreTrainedModel.init_weights -> post_init() first (transformers 5 bookkeeping)")

    for name, fn in (("get_head_mask", get_head_mask), ("invert_attention_mask", invert_attention_mask)):
        if not hasattr(med.BertPreTrainedModel, name):
            setattr(med.BertPreTrainedModel, name, fn)
            shims.append(f"med.BertPreTrainedModel.{name} (transformers 4 behaviour)")

    def random_from_pretrained(cls: type, _path: Any, *model_args: Any, config: Any = None, **kwargs: Any) -> Any:
        """`from_pretrained` without the checkpoint: the same architecture, randomly initialised."""
        return cls(config, *model_args, **kwargs)

    med.BertModel.from_pretrained = classmethod(random_from_pretrained)
    shims.append("med.BertModel.from_pretrained -> cls(config, **kwargs) (random init)")

    def random_clip_load(name: str, device: Any = "cpu", jit: bool = False, download_root: Any = None) -> tuple:
        """`clip.load` without the download: ModifiedCLIP with the hyper-parameters of OpenAI's file."""
        if name != "ViT-B/16":
            raise SystemExit(f"clip.load shim only knows ViT-B/16, got {name}")
        model = clip_model.ModifiedCLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                        vision_patch_size=16, context_length=77, vocab_size=49408,
                                        transformer_width=512, transformer_heads=8, transformer_layers=12)
        clip_model.convert_weights(model)
        model = model.to(device)
        if str(device) == "cpu":
            model.float()
        return model.eval(), None

    official_clip.load = random_clip_load
    shims.append("models.clip.clip.load('ViT-B/16') -> random ModifiedCLIP ViT-B/16 (no download)")
    return shims


def freeze_like_train_py(model: Any, config: dict[str, Any]) -> None:
    """`train.py` main(): which parameters train (by name), when `config['adapter']` is true."""
    if not config.get("adapter"):
        return
    rules = ((model.visumodel, ("adapter", "vis_downsample")), (model.textmodel, ("dapt", "adapter")),
             (model.text_adapter, None), (model.textmodel_clip, ("adapter",)))
    for module, keep in rules:
        for name, parameter in module.named_parameters():
            parameter.requires_grad = keep is None or any(k in name for k in keep)


def optimizer_like_train_py(model: Any, args: argparse.Namespace) -> Any:
    """`train.py`'s four parameter groups and AdamW (the default `--optimizer adamw`)."""
    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if "visumodel" not in n and "textmodel" not in n]},
        {"params": [p for n, p in named if "visumodel" in n and "backbone" in n], "lr": args.lr_visu_cnn},
        {"params": [p for n, p in named if "visumodel" in n and "backbone" not in n], "lr": args.lr_visu_tra},
        {"params": [p for n, p in named if "textmodel" in n], "lr": args.lr_bert},
    ]
    if args.optimizer != "adamw":
        raise SystemExit(f"only the default optimizer (adamw) is reproduced, got {args.optimizer}")
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def random_inputs(batch: int, image_size: int, length: int, nested: type) -> tuple[Any, Any, Any]:
    """(image NestedTensor, text NestedTensor, target boxes), like `src.bench.random_batch`."""
    import torch

    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, : max(2, length // 2)] = 1
    image = nested(torch.randn(batch, 3, image_size, image_size, generator=g),
                   torch.zeros(batch, image_size, image_size, dtype=torch.int32))
    text = nested(torch.randint(1000, 20000, (batch, length), generator=g) * mask, mask)
    boxes = torch.rand(batch, 4, generator=g) * 0.4 + 0.3
    return image, text, boxes


def reset_peak_memory() -> None:
    """Reset the process's RSS high-water mark (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes() -> int:
    """VmHWM since the last reset (Linux), else the process's max RSS."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Wall time of `n` calls of `fn`."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def timings(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and spread (max - min) of a series of durations, in seconds."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "spread_s": max(seconds) - min(seconds)}


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-root", type=Path, required=True, help="checkout of liuting20/MaPPER")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each phase")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each phase")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=518, help="the official code hard-codes 518 (37x37 patches)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    p.add_argument("--stubs-dir", type=Path, default=None, help="where to write stub modules (default: a temp dir)")
    p.add_argument("--check", action="store_true", help="only build the model and run one eval forward")
    args = p.parse_args(argv)
    if args.image_size != 518:
        p.error("the official MaPPER hard-codes 518 px (vit_base(img_size=518), a 37x37 mask, 1371 VL positions)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def build(options: argparse.Namespace, stubs_dir: Path) -> SimpleNamespace:
    """Import and build the official model with the shims; model, optimizer, official args and helpers."""
    root = options.official_root.resolve()
    if not (root / "models" / "mapper_vg.py").is_file():
        raise SystemExit(f"{root} is not a MaPPER checkout (no models/mapper_vg.py)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    stubs = write_stubs(stubs_dir)
    sys.path.insert(0, str(root))
    sys.path.append(str(stubs_dir))
    import torch

    torch.set_num_threads(options.threads)
    shims = [f"stub module {name}" for name in stubs] + install_transformers_shims()
    shims += install_model_shims()

    official_models = importlib.import_module("models")
    trans_vg_loss = importlib.import_module("utils.loss_utils").trans_vg_loss
    nested_tensor = importlib.import_module("utils.misc").NestedTensor

    args = official_args_parser(root).parse_args([])
    args.device = "cpu"
    args.imsize = options.image_size
    config = read_config(root)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with working_directory(root):
        model = official_models.build_model(args, config)
    build_s = time.perf_counter() - start
    freeze_like_train_py(model, config)
    optimizer = optimizer_like_train_py(model, args)
    return SimpleNamespace(model=model, optimizer=optimizer, args=args, config=config, shims=shims,
                           loss=trans_vg_loss, nested=nested_tensor, build_s=build_s)


def parameter_counts(model: Any) -> dict[str, int]:
    """Total and trainable parameters, and the figures `train.py` prints."""
    def count(module: Any, trainable: bool = True) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)

    return {"total": count(model, trainable=False), "trainable": count(model),
            "vis_ada_parameters": count(model.visumodel), "text_ada_parameters": count(model.text_adapter),
            "textmodel_clip": count(model.textmodel_clip), "text_model_adap_bert": count(model.textmodel),
            "vl_transformer": count(model.vl_transformer)}


def measure(options: argparse.Namespace, stubs_dir: Path) -> dict[str, Any]:
    """Build, then time training steps and evaluation forwards."""
    built = build(options, stubs_dir)
    import torch

    model, optimizer = built.model, built.optimizer
    image, text, boxes = random_inputs(options.batch, options.image_size, built.args.max_query_len, built.nested)
    result: dict[str, Any] = {
        "method": "official-mapper", "implementation": "liuting20/MaPPER (unmodified, random weights)",
        "official_root": str(options.official_root.resolve()), "device": "cpu", "precision": "fp32",
        "batch": options.batch, "image_size": options.image_size, "max_query_len": built.args.max_query_len,
        "threads": torch.get_num_threads(), "steps": options.steps, "warmup": options.warmup,
        "torch": torch.__version__, "params": parameter_counts(model), "build_s": built.build_s,
        "shims": built.shims,
    }

    def train_step() -> None:
        losses = built.loss(model(image, text), boxes)
        loss = sum(losses[k] for k in losses)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_forward() -> Any:
        return model(image, text)

    if options.check:
        model.eval()
        start = time.perf_counter()
        out = eval_forward()
        result["check"] = {"eval_forward_s": time.perf_counter() - start, "output_shape": list(out.shape),
                           "output": out.tolist()}
        return result

    model.train()
    timed(train_step, options.warmup)
    reset_peak_memory()
    train = timed(train_step, options.steps)
    train_peak = peak_memory_bytes()
    model.eval()
    timed(eval_forward, options.warmup)
    reset_peak_memory()
    evaluation = timed(eval_forward, options.steps)
    eval_peak = peak_memory_bytes()
    result["train"] = timings(train) | {"steps_per_s": 1 / statistics.median(train),
                                        "images_per_s": options.batch / statistics.median(train),
                                        "peak_bytes": train_peak, "all_s": train}
    result["eval"] = timings(evaluation) | {"images_per_s": options.batch / statistics.median(evaluation),
                                            "peak_bytes": eval_peak, "all_s": evaluation}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    options = parse(argv)
    with contextlib.ExitStack() as stack:
        stubs_dir = options.stubs_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mapper_stubs")))
        stubs_dir.mkdir(parents=True, exist_ok=True)
        result = measure(options, stubs_dir)
    line = json.dumps(result)
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(result, indent=2) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
