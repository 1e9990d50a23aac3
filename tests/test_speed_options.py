"""The speed and memory switches: frozen weights in bf16 (`model.frozen_bf16`), the CLIP-prior cache
(`model.prior_cache`) and `model.compile`. Checkpointing is tested with the model (test_model.py)."""

from __future__ import annotations

import pytest
import torch

from src.models.prior_cache import PriorCache
from tests.test_checkpoints import METHODS, module_for
from tests.test_model import B, inputs

TARGET = torch.tensor([[0.5, 0.5, 0.2, 0.3]] * B)


def train_step(module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.model.train()
    loss = module.loss(module(inputs()).boxes, TARGET)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("peft", ["mapper", "lora", "adapter", "dora", "frozen"])
def test_frozen_bf16_keeps_only_frozen_backbone_weights_in_bf16_and_still_trains(peft):
    plain = module_for(peft)
    half = module_for(peft, "model.frozen_bf16=true")
    dtypes = {n: p.dtype for n, p in half.model.named_parameters()}
    for name, p in half.model.named_parameters():
        in_backbone = name.startswith(("vision.", "text.", "prior."))
        expected = torch.bfloat16 if in_backbone and not p.requires_grad else torch.float32
        assert p.dtype == expected, (name, p.dtype)
    assert torch.bfloat16 in dtypes.values()
    assert all(b.dtype == pb.dtype for b, pb in zip(half.model.buffers(), plain.model.buffers(), strict=True))

    # no autocast around the call: the grounder runs its backbones under bf16 autocast by itself, the
    # fusion and head in fp32; the result is the fp32 model's up to bf16 rounding
    half.model.eval(), plain.model.eval()
    with torch.no_grad():
        boxes, reference = half(inputs()).boxes, plain(inputs()).boxes
    assert boxes.dtype == torch.float32 and torch.allclose(boxes, reference, atol=0.03)
    loss, grads = train_step(half)
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads.values())

    # its weights load into an fp32 model (trainable tensors exactly; frozen ones are the same weights)
    plain.model.load_state_dict(half.model.state_dict())
    assert all(p.dtype == torch.float32 for p in plain.model.parameters())


def test_frozen_bf16_is_refused_with_fp32_evaluation():
    from src.config import compose
    from src.run import trainer_settings

    assert trainer_settings(compose(["model.frozen_bf16=true"])) == {}
    with pytest.raises(ValueError, match="frozen_bf16"):
        trainer_settings(compose(["model.frozen_bf16=true", "eval_fp32=true"]))


def test_prior_cache_reads_back_what_it_computed():
    calls = []

    def compute(ids, mask):
        calls.append(ids.shape[0])
        return ids[..., None].float() * 2 + mask[..., None]

    cache = PriorCache(capacity=3)
    ids = torch.tensor([[1, 2, 0], [3, 4, 5], [1, 2, 0]])
    mask = (ids > 0).long()
    expected = compute(ids, mask)
    calls.clear()
    assert torch.equal(cache(ids, mask, compute), expected)
    assert calls == [2] and (cache.hits, cache.misses) == (1, 2)  # the repeated phrase computed once
    assert torch.equal(cache(ids[:2], mask[:2], compute), expected[:2]) and calls == [2]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another autocast state: other entries
        cache(ids[:1], mask[:1], compute)
    assert calls == [2, 1] and len(cache.rows) == 3
    cache(torch.tensor([[7, 0, 0]]), torch.tensor([[1, 0, 0]]), compute)
    assert len(cache.rows) == 3  # the least recently used entry made room
    cache(ids[1:2], mask[1:2], compute)  # still there: it was used after the dropped one
    assert calls == [2, 1, 1]
    with pytest.raises(ValueError, match="capacity"):
        PriorCache(0)


def test_prior_cache_changes_no_training_step_and_clears_when_weights_load():
    plain, cached = module_for("mapper", *METHODS["mapper"]), module_for("mapper", *METHODS["mapper"],
                                                                        "model.prior_cache=16")
    cache = cached.model.prior.cache
    for _ in range(2):  # the second step reads every prior from the cache
        for module in (plain, cached):
            for p in module.model.parameters():
                p.grad = None
        (loss, grads), (cached_loss, cached_grads) = train_step(plain), train_step(cached)
        assert torch.allclose(loss, cached_loss, atol=1e-6)
        assert all(torch.allclose(grads[n], cached_grads[n], atol=1e-6) for n in grads)
    assert (cache.misses, cache.hits) == (B, B) and len(cache.rows) == B
    cached.model.load_state_dict(plain.model.state_dict())
    assert len(cache.rows) == 0


@pytest.mark.slow  # inductor compiles C++ on the first step: about a minute on 2 cores with a cold cache
def test_compile_option_trains_the_same_model():
    plain, compiled = module_for("lora"), module_for("lora", "model.compile=true")
    loss, grads = train_step(plain)
    compiled_loss, compiled_grads = train_step(compiled)
    assert torch.allclose(loss, compiled_loss, atol=1e-5)
    assert all(torch.allclose(grads[n], compiled_grads[n], atol=1e-5) for n in grads)
    assert compiled.model.state_dict().keys() == plain.model.state_dict().keys()
