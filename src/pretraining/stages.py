"""The synthetic benchmark's own preparation: cached pretraining stages for random-init tiny backbones.

Run by every process before its model is built; the stages' caches are built once (the first process
builds, concurrent ones, e.g. DDP ranks on a node, wait for it: `src.storage.weights_cache`) and read
by all. Benchmarks with pretrained backbones need none of it.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from src.models.encoders import PriorSettings, TextSettings
from src.pretraining.text import TextPretraining, clip_tower, ensure_pretrained_text, text_tower
from src.pretraining.vision import VisionPretraining, ensure_pretrained_vit
from src.quirks import ModelQuirks

log = logging.getLogger(__name__)


def apply_backbone_pretraining(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """Run (or reuse) the cached synthetic pretraining of random-init backbones and point the model at it.

    Both stages train on a separate synthetic corpus (`pretraining_corpus`): the ViT on its scenes
    (`vision_pretraining`), BERT and the CLIP prior on its expressions (`text_pretraining`). Only
    meaningful for randomly initialised backbones on the synthetic benchmark; skipped otherwise.
    """
    vision_stage, text_stage = cfg.get("vision_pretraining"), cfg.get("text_pretraining")
    if not (vision_stage or text_stage):
        return
    spec = getattr(datamodule, "spec", None)
    if cfg.model.pretrained or spec is None or not spec.pretrains_backbones:
        log.info("backbone pretraining skipped: it is for random-init backbones on the synthetic benchmark")
        return
    corpus = datamodule.pretraining_corpus(**cfg.pretraining_corpus)
    model, cache = cfg.model, Path(cfg.paths.cache_dir)
    quirks = ModelQuirks.resolve(model.mode, model.get("quirks"))
    paths: dict[str, Path] = {}
    if vision_stage:
        paths["vision"] = ensure_pretrained_vit(
            corpus, plain(model.vision), model.image_size, VisionPretraining(**vision_stage), cache,
            drop_registers=quirks.drop_vision_registers,
        )
    if text_stage:
        bert_tok, clip_tok = datamodule.tokenizers()
        text, prior = TextSettings(**plain(model.text)), PriorSettings(**plain(model.prior))
        token_type = not quirks.bert_without_token_type  # the official BERT has no token-type table
        tower = partial(text_tower, text, token_type=token_type)
        stage = TextPretraining(**text_stage)
        # the family names the tower in the cache key ("bert" as before other families existed)
        paths["text"] = ensure_pretrained_text(corpus, text.arch, text.config, tower, bert_tok, model.max_query_len,
                                               stage, cache, variant={"token_type": token_type})
        paths["prior"] = ensure_pretrained_text(corpus, "clip", prior.config, partial(clip_tower, prior), clip_tok,
                                                model.max_query_len, stage, cache)
    with open_dict(cfg):
        for part, path in paths.items():
            cfg.model[part].init_checkpoint = str(path)


def plain(node: DictConfig) -> dict:
    """A config node as a plain dict without its `init_checkpoint` (which pretraining itself sets)."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "init_checkpoint"}
