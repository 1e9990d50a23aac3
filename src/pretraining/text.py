"""A short, cached pretraining stage for the randomly initialised text towers (BERT and the CLIP prior).

The companion of `src/pretraining/vision.py`: no pretrained language model exists offline, and a frozen
random BERT maps each word to a random vector entangled with its position, from which the fusion
learns to read the phrase very slowly. This stage gives the tiny towers what a pretrained language
model gives the real one, the meaning of the words: trained on the expressions of a separate
synthetic corpus (text only, never an image or a box), every token learns to predict the structured
expression the phrase encodes (its kind, the target's colour / shape / size words, the direction word,
the anchor's words; the generator stores these beside each phrase). The weights are cached by their
settings and the grounder loads them (`model.text.init_checkpoint`, `model.prior.init_checkpoint`)
and freezes them as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from src.data.synthetic import record_attributes, split_path
from src.data.tokenizers import Tokenizer
from src.models.encoders import (
    PriorSettings,
    TextEncoder,
    TextPrior,
    TextSettings,
    build_clip_text,
    build_text,
)
from src.progress import Progress
from src.storage.weights_cache import cached_state_dict
from src.training.schedules import one_cycle

log = logging.getLogger(__name__)

# Per-token features (B, L, D) of a text tower from token ids and their mask.
TowerFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TextPretraining:
    """Settings of the stage (all of them, with the tower's settings, key the cache)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 1.0e-3
    seed: int = 0


def text_tower(settings: TextSettings, token_type: bool = True) -> tuple[nn.Module, TowerFn]:
    """A random text encoder (BERT by default) built from `settings` (the module to save) and its per-token
    features."""
    encoder = TextEncoder(build_text(settings, pretrained=False, token_type=token_type))
    return encoder.bert, encoder


def clip_tower(settings: PriorSettings) -> tuple[nn.Module, TowerFn]:
    """A random CLIP text tower built from `settings` (the module to save) and its projected token features."""
    tower = TextPrior(build_clip_text(settings, pretrained=False))
    return tower.clip, tower


def expression_fields(expression: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The structured expression flattened to its string leaves, e.g. {"np.colour": "red", "kind": "np"}.

    `forms` (which surface template was used) is left out: it says how, not what.
    """
    fields: dict[str, str] = {}
    for key, value in expression.items():
        if key == "forms":
            continue
        if isinstance(value, dict):
            fields.update(expression_fields(value, f"{prefix}{key}."))
        else:
            fields[f"{prefix}{key}"] = str(value)
    return fields


def phrase_labels(root: Path) -> tuple[list[str], dict[str, list[str]], torch.Tensor]:
    """Phrases of a synthetic corpus' train split, the label vocabulary per field, and labels (N, F)."""
    records = torch.load(split_path(root, "train"), weights_only=True)
    phrases = [phrase for _, _, _, phrase, _ in records]
    rows = [expression_fields(record_attributes(record)["expression"]) for record in records]
    names = sorted({name for row in rows for name in row})
    vocab = {name: sorted({row.get(name, "") for row in rows} | {""}) for name in names}
    labels = torch.tensor([[vocab[name].index(row.get(name, "")) for name in names] for row in rows])
    return phrases, vocab, labels


def ensure_pretrained_text(
    corpus: Path, tower: str, tower_config: dict[str, Any], build: Callable[[], tuple[nn.Module, TowerFn]],
    tokenizer: Tokenizer, max_len: int, settings: TextPretraining, cache_dir: Path,
    variant: dict[str, Any] | None = None,
) -> Path:
    """Path of the pretrained state dict of a text tower, training it first if not cached.

    `build()` returns the freshly built module to save and the function giving its per-token
    features; `tower` (the text family, e.g. "bert", or "clip"), `tower_config` and `variant` (anything
    else that changes the built module, e.g. whether BERT has a token-type table) name it in the cache key.
    """
    key = {"corpus": corpus.name, "tower": tower, "config": tower_config, "max_len": max_len, **asdict(settings),
           **(variant or {})}

    def train() -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        torch.manual_seed(settings.seed)
        module, features = build()
        phrases, vocab, labels = phrase_labels(corpus)
        ids, mask = tokenizer(phrases, max_len)
        loss = train_tokens(module, features, ids, mask, labels, [len(v) for v in vocab.values()], settings, tower)
        log.info("%s pretraining: %d steps in %.1f s, final loss %.3f", tower, settings.steps,
                 time.perf_counter() - start, loss)
        return module.state_dict()

    return cached_state_dict(cache_dir, tower, key, train)


def train_tokens(
    module: nn.Module, features: TowerFn, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
    classes: Sequence[int], settings: TextPretraining, what: str = "text",
) -> float:
    """Train `module` so that every real token predicts every field of its phrase; returns the last loss.

    The linear head is discarded afterwards. Padding tokens carry no loss. Logs a progress line (`<what>
    pretraining: step, loss, speed, time left`) about every 10 s, reading the loss only then (no host sync on
    the other steps).
    """
    probe = features(ids[:1], mask[:1])
    head = nn.Linear(probe.shape[-1], sum(classes))
    # fused: one kernel per step; the vocabulary tables (2-3M entries) made the per-tensor updates half the step
    optimizer = torch.optim.AdamW(
        [*module.parameters(), *head.parameters()], lr=settings.lr, weight_decay=1e-4, fused=True
    )
    schedule = one_cycle(optimizer, settings.lr, settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    module.train()
    loss = torch.zeros(())
    progress = Progress(f"{what} pretraining", settings.steps, log.info)
    for step in range(1, settings.steps + 1):
        idx = torch.randint(0, len(ids), (settings.batch_size,), generator=generator)
        logits = head(features(ids[idx], mask[idx]))[mask[idx].bool()]  # (real tokens, sum(classes))
        token_labels = labels[idx][:, None].expand(-1, ids.shape[1], -1)[mask[idx].bool()]
        parts = torch.split(logits, list(classes), dim=-1)
        loss = sum(F.cross_entropy(part, token_labels[:, k]) for k, part in enumerate(parts)) / len(parts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress.due(step):
            progress.line(step, loss=float(loss.detach()))
    module.eval()
    return float(loss.detach())
