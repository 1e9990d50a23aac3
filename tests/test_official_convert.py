"""The official-checkpoint converter: the rule table, strict loading, problem reports, safe reading, CLI."""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import src.convert_official as cli
from src.models.grounder import build_grounder
from src.models.official import (
    OfficialCheckpointError,
    OfficialGeometry,
    build_official_grounder,
    convert_state_dict,
    infer_geometry,
    load_official,
)
from src.models.peft.mapper import Mapper
from src.training.lit import GroundingModule
from tests.conftest import TINY_MODEL
from tests.parity_recipe import load_manifest, recipe_inputs, recipe_state_dict, zeros_state_dict

PAPER = OfficialGeometry(image_size=518, patch_size=14, max_query_len=20, vision_layers=(3, 7, 11),
                         text_layers=(3, 7, 11))
# ../shared/parity/README.md §1 "Unused in the official forward pass".
README_UNUSED = (
    "visumodel.mask_token", "textmodel.bert.encoder.layer.*.crossattention.*", "*.dapt_text.clip_down_proj.*",
    "textmodel_clip.clip.visual.*", "textmodel_clip.clip.logit_scale", "*.num_batches_tracked",
)
# Unused, but the suite keeps them: official mode builds DyPA's dead projection (parameter counts and
# checkpoints match) and BatchNorm's counters are ordinary BN state.
KEPT_UNUSED = ("*.dapt_text.clip_down_proj.*", "*.num_batches_tracked")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


@pytest.fixture(scope="module")
def manifest(shared_dir: Path) -> list[dict[str, Any]]:
    """The official model's state-dict manifest (991 entries)."""
    return load_manifest(shared_dir / "parity" / "official_mapper_manifest.json")


@pytest.fixture(scope="module")
def paper_model() -> torch.nn.Module:
    """The full-size mode=official grounder, random init, no downloads (built once: ~10 s)."""
    return build_official_grounder(PAPER)


# --- the rule table, on small fake tensors -------------------------------------------------------------
def test_rules_split_transpose_and_follow_adapter_wrapping() -> None:
    clip = "textmodel_clip.clip.transformer.resblocks.resblock_0."
    official = {
        clip + "attn.in_proj_weight": torch.arange(12.0).view(6, 2),
        clip + "attn.in_proj_bias": torch.arange(6.0),
        "textmodel_clip.clip.text_projection": torch.arange(6.0).view(2, 3),
        "visumodel.blocks.0.mlp.fc1.weight": torch.zeros(1),
        "visumodel.blocks.3.mlp.fc1.weight": torch.zeros(1),
        "visumodel.blocks.3.adapter.D_fc1.weight": torch.zeros(1),
        "visumodel.blocks.3.adapter.branch2.1.bn.running_var": torch.ones(1),
        "textmodel.bert.encoder.layer.0.output.dense.weight": torch.zeros(1),
        "textmodel.bert.encoder.layer.3.output.LayerNorm.bias": torch.zeros(1),
        "textmodel.bert.encoder.layer.3.dapt_text.bert_adapter_layer_norm_before.weight": torch.zeros(1),
        "textmodel.bert.encoder.layer.3.dapt_text.clip_adapter_layer_norm_before.weight": torch.zeros(1),
        "textmodel.bert.encoder.layer.3.crossattention.self.query.weight": torch.zeros(1),
        "vl_transformer.encoder.layers.5.self_attn.in_proj_weight": torch.zeros(1),
        "bbox_embed.layers.2.bias": torch.zeros(1),
        "something.new": torch.zeros(1),
    }
    state, unmapped, missing, dropped, mismatched = convert_state_dict(official)
    q = "prior.clip.text_model.encoder.layers.0.self_attn."
    assert state[q + "q_proj.weight"].tolist() == [[0, 1], [2, 3]]  # rows [q; k; v]
    assert state[q + "v_proj.weight"].tolist() == [[8, 9], [10, 11]]
    assert state[q + "k_proj.bias"].tolist() == [2, 3]
    assert torch.equal(state["prior.clip.text_projection.weight"], torch.arange(6.0).view(2, 3).t())
    assert "vision.vit.blocks.0.mlp.fc1.weight" in state  # no LoCA in block 0: MLP not wrapped
    assert "vision.vit.blocks.3.mlp.mlp.fc1.weight" in state  # LoCA in block 3: MLP wrapped
    assert "vision.vit.blocks.3.mlp.adapter.fc1.weight" in state
    assert "vision.vit.blocks.3.mlp.adapter.branch2.1.1.running_var" in state
    assert "text.bert.encoder.layer.0.output.dense.weight" in state
    assert "text.bert.encoder.layer.3.output.output.LayerNorm.bias" in state
    assert "text.bert.encoder.layer.3.output.adapter.norm.weight" in state
    assert "text.bert.encoder.layer.3.output.adapter.prior_norm.weight" in state
    assert "fusion.layers.5.self_attn.in_proj_weight" in state and "head.layers.2.bias" in state
    assert unmapped == ["something.new"]
    assert list(dropped) == ["textmodel.bert.encoder.layer.3.crossattention.self.query.weight"]
    assert not missing and not mismatched  # no target given: nothing to compare against


def test_geometry_is_inferred_from_shapes() -> None:
    def official(vis_tokens: int, vl_rows: int, patch: int = 14) -> dict[str, torch.Tensor]:
        return {
            "visumodel.patch_embed.proj.weight": torch.empty(768, 3, patch, patch, device="meta"),
            "visumodel.pos_embed": torch.empty(1, vis_tokens, 768, device="meta"),
            "vl_pos_embed.weight": torch.empty(vl_rows, 256, device="meta"),
            "visumodel.blocks.7.adapter.D_fc1.weight": torch.empty(1, device="meta"),
            "textmodel.bert.encoder.layer.11.dapt_text.scale.weight": torch.empty(1, device="meta"),
        }

    paper = infer_geometry(official(1370, 1391))
    assert (paper.image_size, paper.max_query_len, paper.vision_layers, paper.text_layers) == (518, 20, (7,), (11,))
    assert infer_geometry(official(1370, 1411)).max_query_len == 40  # RefCOCOg
    assert infer_geometry(official(257, 1 + 20 + 257)).image_size == 224
    with pytest.raises(OfficialCheckpointError, match="square"):
        infer_geometry(official(1371, 1392))
    with pytest.raises(OfficialCheckpointError, match="vl_pos_embed"):
        infer_geometry({k: v for k, v in official(1370, 1391).items() if k != "vl_pos_embed.weight"})


# --- the whole manifest against the full-size model ----------------------------------------------------
def test_manifest_converts_without_surprises_and_loads_strictly(manifest, paper_model) -> None:
    official = zeros_state_dict(manifest)
    official["textmodel.bert.embeddings.position_ids"] = torch.arange(512).view(1, 512)
    assert infer_geometry(official) == PAPER
    conversion = load_official(paper_model, official)
    assert conversion.unmapped == [] and conversion.missing == [] and conversion.mismatched == []
    assert len(conversion.state) == len(paper_model.state_dict())
    unused = {e["key"] for e in manifest if _matches(e["key"], README_UNUSED)}
    kept = {k for k in unused if _matches(k, KEPT_UNUSED)}
    # Dropped: exactly the README's unused tensors the suite does not build, plus BERT's position-id
    # table (read by the official forward, but it only holds 0..511, which HF BERT builds itself).
    assert set(conversion.dropped) == (unused - kept) | {"textmodel.bert.embeddings.position_ids"}
    assert len(kept) == 3 * 2 + 9 and not kept & set(conversion.dropped)  # 3 DyPA x (weight, bias) + 9 BN


def test_tampered_state_dict_reports_every_problem(manifest, paper_model) -> None:
    official = zeros_state_dict(manifest, keep=lambda k: not k.startswith("textmodel_clip.clip.visual."))
    official["textmodel.bert.embeddings.position_ids"] = torch.arange(512).view(1, 512).flip(1)
    official["visumodel.register_tokens"] = torch.zeros(1, 4, 768)  # no rule knows it
    del official["vl_transformer.encoder.layers.2.linear1.bias"]  # nothing fills fusion.layers.2.linear1.bias
    official["text_proj.weight"] = torch.zeros(256, 700)  # wrong shape
    before = paper_model.text_proj.weight.detach().clone()
    with pytest.raises(OfficialCheckpointError) as err:
        load_official(paper_model, official)
    message = str(err.value)
    assert "4 problems" in message
    assert "unmapped official key: visumodel.register_tokens" in message
    assert "missing suite key: fusion.layers.2.linear1.bias" in message
    assert "text_proj.weight -> text_proj.weight: shape (256, 700) vs suite (256, 768)" in message
    assert "textmodel.bert.embeddings.position_ids: dropped, but its content differs" in message
    assert torch.equal(paper_model.text_proj.weight, before)  # nothing was loaded


def test_adapter_placement_mismatch_is_reported(manifest, paper_model) -> None:
    official = zeros_state_dict(manifest, keep=lambda k: ".blocks.7.adapter." not in k)
    with pytest.raises(OfficialCheckpointError) as err:
        load_official(paper_model, official)  # built with LoCA in block 7; the checkpoint has none there
    message = str(err.value)
    assert "missing suite key: vision.vit.blocks.7.mlp.adapter.fc1.weight" in message
    assert "visumodel.blocks.7.mlp.fc1.weight -> vision.vit.blocks.7.mlp.fc1.weight: no such suite key" in message


# --- reading official files safely ---------------------------------------------------------------------
class _Exploit:
    def __reduce__(self):
        return (print, ("UNPICKLED-ARBITRARY-CODE",))


def test_reading_allows_namespace_args_and_nothing_else(tmp_path: Path, capsys) -> None:
    state = {"visu_proj.bias": torch.ones(2)}
    args = argparse.Namespace(dataset="unc", max_query_len=20, lr=1e-4, aug_crop=True, bert_enc_num=12)
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "lr_scheduler": {"step_size": 60}, "epoch": 89, "args": args, "val_accu": torch.tensor(0.86)},
               tmp_path / "official.pth")
    got, extra = cli.read_official_checkpoint(tmp_path / "official.pth")
    assert got.keys() == state.keys() and extra["epoch"] == 89 and extra["args"] == args

    torch.save({"module.visu_proj.bias": torch.ones(2)}, tmp_path / "bare_ddp.pth")  # bare, DDP-prefixed
    assert list(cli.read_official_checkpoint(tmp_path / "bare_ddp.pth")[0]) == ["visu_proj.bias"]

    torch.save({"model": state, "extra": _Exploit()}, tmp_path / "exploit.pth")
    with pytest.raises(OfficialCheckpointError, match="not unpickled"):
        cli.read_official_checkpoint(tmp_path / "exploit.pth")
    assert "UNPICKLED-ARBITRARY-CODE" not in capsys.readouterr().out

    torch.save({"state_dict": {"model.visu_proj.bias": torch.ones(2)}, "epoch": 3}, tmp_path / "suite.ckpt")
    with pytest.raises(OfficialCheckpointError, match="already in the suite's format"):
        cli.read_official_checkpoint(tmp_path / "suite.ckpt")


def test_cli_rejects_a_query_length_the_checkpoint_does_not_have(tmp_path: Path, capsys) -> None:
    official = {
        "visumodel.patch_embed.proj.weight": torch.zeros(768, 3, 14, 14),
        "visumodel.pos_embed": torch.zeros(1, 1370, 768),
        "vl_pos_embed.weight": torch.zeros(1391, 256),
    }
    torch.save({"model": official}, tmp_path / "in.pth")
    assert cli.main([str(tmp_path / "in.pth"), str(tmp_path / "out.ckpt"), "--max-query-len", "40"]) == 1
    assert "--max-query-len 40 does not match the checkpoint, whose shapes give 20" in capsys.readouterr().err
    assert not (tmp_path / "out.ckpt").exists()


# --- the suite checkpoint format -----------------------------------------------------------------------
def _tiny_module(seed: int) -> GroundingModule:
    torch.manual_seed(seed)
    model = build_grounder(Mapper(rank=4, loca_hidden=12, loca_branch1=8, loca_branch2_mid=4, loca_branch2_out=4),
                           mode="official", **TINY_MODEL)
    return GroundingModule(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-4))


def test_written_checkpoint_is_restored_by_trainer_test(tmp_path: Path) -> None:
    source, target = _tiny_module(0), _tiny_module(1)
    geometry = OfficialGeometry(TINY_MODEL["image_size"], 8, TINY_MODEL["max_query_len"], (1, 3), (1, 3))
    written = cli.write_outputs(source.model, geometry, "in.pth", {"epoch": 5}, tmp_path / "out.ckpt", True)
    assert written == [tmp_path / "out.ckpt", tmp_path / "out.safetensors"]
    b, s, n = 2, TINY_MODEL["image_size"], TINY_MODEL["max_query_len"]
    batch = {"image": torch.randn(b, 3, s, s), "pixel_mask": torch.zeros(b, s, s, dtype=torch.int32),
             "text_ids": torch.randint(1, 200, (b, n)), "text_mask": torch.ones(b, n, dtype=torch.long),
             "box": torch.full((b, 4), 0.5)}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.test(target, dataloaders=torch.utils.data.DataLoader([batch], batch_size=None),
                 ckpt_path=str(tmp_path / "out.ckpt"), verbose=False)
    for (key, a), (_, c) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, c), key
    bare = load_file(str(tmp_path / "out.safetensors"))
    assert bare.keys() == source.model.state_dict().keys()


def test_cli_end_to_end_on_the_manifest(tmp_path: Path, manifest, monkeypatch, capsys) -> None:
    official = zeros_state_dict(manifest)
    official["textmodel.bert.embeddings.position_ids"] = torch.arange(512).view(1, 512)
    official["reg_token.weight"] = torch.randn(1, 256)
    # Official GPU runs keep CLIP in fp16 (clip.model.convert_weights): it loads as fp32, losslessly.
    official["textmodel_clip.clip.text_projection"] = torch.randn(512, 512).half()
    args = argparse.Namespace(dataset="unc", max_query_len=20)
    # The file reading is tested above; here the 1.5 GB official dict stays in memory.
    monkeypatch.setattr(cli, "read_official_checkpoint", lambda path: (official, {"epoch": 89, "args": args}))
    assert cli.main([str(tmp_path / "official.pth"), str(tmp_path / "mapper.ckpt")]) == 0
    report = capsys.readouterr().out
    assert "surprising unmapped official keys: 0" in report and "max_query_len 20" in report

    ckpt = torch.load(tmp_path / "mapper.ckpt", weights_only=True)  # plain tensors and containers only
    assert ckpt["pytorch-lightning_version"] == L.__version__
    assert ckpt["mapper_official"]["geometry"]["max_query_len"] == 20
    assert ckpt["mapper_official"]["official_epoch"] == 89
    assert ckpt["mapper_official"]["official_args"] == {"dataset": "unc", "max_query_len": 20}
    state = ckpt["state_dict"]
    assert all(k.startswith("model.") for k in state)
    assert torch.equal(state["model.reg_token.weight"], official["reg_token.weight"])
    assert torch.equal(state["model.prior.clip.text_projection.weight"],
                       official["textmodel_clip.clip.text_projection"].t().float())
    bare = load_file(str(tmp_path / "mapper.safetensors"))
    assert {"model." + k for k in bare} == set(state)
    assert torch.equal(bare["reg_token.weight"], official["reg_token.weight"])
    # The suite's checkpoint format: the config that rebuilds this model, every tensor stored.
    from src.storage.checkpoints import CHECKPOINT_FORMAT, read_checkpoint

    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["frozen_fingerprint"] == {}
    model_cfg = ckpt["config"]["model"]
    assert (model_cfg["mode"], model_cfg["pretrained"], model_cfg["max_query_len"]) == ("official", False, 20)
    assert model_cfg["adapter_layers"] == {"vision": [3, 7, 11], "text": [3, 7, 11]}
    assert (ckpt["config"]["peft"]["name"], ckpt["config"]["peft"]["method"]) == ("mapper", "mapper")
    for path in (tmp_path / "mapper.ckpt", tmp_path / "mapper.safetensors"):
        _, config, prints = read_checkpoint(path)
        assert config == ckpt["config"] and prints == {}


@pytest.mark.slow
def test_cli_full_file_round_trip_reproduces_the_official_boxes(tmp_path: Path, shared_dir: Path) -> None:
    """Official .pth (all 991 tensors, the unused ones included) -> CLI -> Trainer.test(ckpt_path) -> boxes."""
    parity = shared_dir / "parity"
    case = json.loads((parity / "cases" / "case_01.json").read_text())
    official = recipe_state_dict(load_manifest(parity / case["weights"]["manifest"]), case["weights"])
    args = argparse.Namespace(dataset="unc", imsize=518, max_query_len=20)
    torch.save({"model": official, "epoch": 89, "args": args}, tmp_path / "best_checkpoint.pth")
    del official
    assert cli.main([str(tmp_path / "best_checkpoint.pth"), str(tmp_path / "mapper.ckpt")]) == 0
    (tmp_path / "best_checkpoint.pth").unlink()

    class Recording(GroundingModule):
        def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
            self.boxes = self(batch).boxes
            self.test_metrics[dataloader_idx].update(self.boxes, batch["box"])

    module = Recording(build_official_grounder(PAPER), optimizer=functools.partial(torch.optim.AdamW, lr=1e-4))
    batch = recipe_inputs(case["inputs"]) | {"box": torch.tensor(case["expected"]["pred_boxes"])}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        trainer.test(module, dataloaders=torch.utils.data.DataLoader([batch], batch_size=None),
                     ckpt_path=str(tmp_path / "mapper.ckpt"), verbose=False)
    finally:
        torch.set_num_threads(before)
    error = (module.boxes.double() - torch.tensor(case["expected"]["pred_boxes"], dtype=torch.float64)).abs().max()
    assert error <= case["expected"]["atol"]
