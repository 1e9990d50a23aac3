"""The speed and memory switches: frozen weights in bf16 (`model.frozen_bf16`), the CLIP-prior cache
(`model.prior_cache`), the ViT frozen-prefix cache (`model.vision_prefix_cache`) and `model.compile`.
Checkpointing is tested with the model (test_model.py)."""

from __future__ import annotations

import pickle

import pytest
import torch

from src.models.row_cache import PriorCache, RowCache
from tests.test_checkpoints import module_for
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
    plain = module_for("mapper", "model.prior_cache=0")
    cached = module_for("mapper", "model.prior_cache=16")
    assert plain.model.prior.cache is None
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
    cached.model(**inputs())
    assert (cache.misses, cache.hits) == (2 * B, B)  # loaded weights: every prior computed again
    restored = pickle.loads(pickle.dumps(cached.model))  # ddp_spawn pickles the model
    restored(**inputs())
    assert len(restored.prior.cache.rows) == B


# the tiny test model has 4 ViT blocks, adapted at 1 and 3
@pytest.mark.parametrize(("peft", "depth"), [("mapper", 1), ("lora", 1), ("adapter", 1), ("frozen", 4), ("full", 0)])
def test_frozen_prefix_depth_stops_at_the_first_tuned_block(peft, depth):
    module = module_for(peft, "model.vision_prefix_cache=8")
    vision = module.model.vision
    module.model.train()  # the grounder's train(): frozen backbone modules stay in eval mode
    assert vision.frozen_prefix_depth() == depth
    torch.nn.Module.train(module.model, True)  # every module in training mode (dropout would act): nothing fixed
    assert vision.frozen_prefix_depth() == 0
    module.model.eval()
    assert vision.frozen_prefix_depth() == depth


def test_vision_prefix_cache_changes_no_training_step_and_clears_when_weights_load():
    plain = module_for("mapper", "model.vision_prefix_cache=0")
    cached = module_for("mapper", "model.vision_prefix_cache=16")
    assert plain.model.vision.prefix_cache is None
    cache = cached.model.vision.prefix_cache
    batch = inputs()
    keyed = batch | {"image_key": torch.tensor([11, 12])}
    for _ in range(2):  # the second step reads the prefix of both images from the cache
        for module in (plain, cached):
            for p in module.model.parameters():
                p.grad = None
        plain.model.train(), cached.model.train()
        loss = plain.loss(plain(batch).boxes, TARGET)["loss"]
        loss.backward()
        cached_loss = cached.loss(cached(keyed).boxes, TARGET)["loss"]
        cached_loss.backward()
        assert torch.allclose(loss, cached_loss, atol=1e-6)
        for (name, p), q in zip(plain.model.named_parameters(), cached.model.parameters(), strict=True):
            if p.requires_grad:
                assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert (cache.misses, cache.hits) == (B, B) and len(cache.rows) == B
    cached.model.eval()
    with torch.no_grad():  # evaluation reads the same entries
        assert torch.allclose(cached(keyed).boxes, plain(batch).boxes.detach(), atol=1e-6)
    assert cache.hits == 2 * B
    cached.model.load_state_dict(plain.model.state_dict())
    with torch.no_grad():
        cached(keyed)
    assert (cache.misses, cache.hits) == (2 * B, 2 * B)  # loaded weights: every prefix computed again
    restored = pickle.loads(pickle.dumps(cached.model))  # ddp_spawn pickles the model
    restored(**keyed)
    assert len(restored.vision.prefix_cache.rows) == B


def test_cached_rows_own_their_storage_and_the_bytes_are_bounded():
    row_bytes = 16 * 4
    cache = RowCache(capacity=100, max_bytes=3 * row_bytes)
    batch = torch.arange(5 * 16, dtype=torch.float32).reshape(5, 16)
    out = cache.lookup(list("abcde"), lambda index: batch[index])
    assert torch.equal(out, batch)
    assert all(r.untyped_storage().nbytes() == row_bytes for r in cache.rows.values())  # no view of the batch
    assert list(cache.rows) == list("cde") and cache.bytes == 3 * row_bytes  # the byte bound dropped a, b


def weight_changes(vit):
    """Ways the frozen prefix's weights change in place or get replaced, after which no row is valid."""
    block = vit.blocks[0]

    def in_place():
        with torch.no_grad():
            block.mlp.fc1.weight.mul_(1.5)

    def foreach_swap():  # an EMA / SWA swap of the weights
        params = list(block.parameters())
        with torch.no_grad():
            torch._foreach_copy_(params, [p * 0.5 for p in params])

    def replaced():
        block.mlp.fc1.weight = torch.nn.Parameter(block.mlp.fc1.weight.detach() * 2, requires_grad=False)

    def stem():
        with torch.no_grad():
            vit.patch_embed.proj.weight.add_(0.1)

    return {"in_place": in_place, "foreach_swap": foreach_swap, "replaced": replaced, "stem": stem}


@pytest.mark.parametrize("change", ["in_place", "foreach_swap", "replaced", "stem"])
def test_vision_prefix_cache_is_invalidated_by_any_change_of_its_weights(change: str):
    plain = module_for("mapper", "model.vision_prefix_cache=0")
    cached = module_for("mapper", "model.vision_prefix_cache=16")
    batch = inputs()
    keyed = batch | {"image_key": torch.tensor([11, 12])}
    plain.model.eval(), cached.model.eval()
    with torch.no_grad():
        cached(keyed)
        for module in (plain, cached):
            weight_changes(module.model.vision.vit)[change]()
        assert torch.allclose(cached(keyed).boxes, plain(batch).boxes, atol=1e-6)
    assert cached.model.vision.prefix_cache.misses == 2 * B


def test_cached_samples_carry_an_image_digest_that_collate_stacks():
    from src.data.dataset import CachedSamples, collate, image_digest

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 8, 8, generator=g) for _ in range(2)]
    base = {"pixel_mask": torch.zeros(8, 8, dtype=torch.bool), "text_ids": torch.zeros(4, dtype=torch.long),
            "text_mask": torch.ones(4, dtype=torch.long), "prior_ids": torch.zeros(4, dtype=torch.long),
            "prior_mask": torch.ones(4, dtype=torch.long), "box": torch.rand(4), "phrase": "a", "image_file": "x"}
    samples = [base | {"image": images[i % 2], "index": i} for i in range(3)]
    cached = CachedSamples(samples)
    keys = [s["image_key"] for s in cached]
    assert keys[0] == keys[2] and keys[0] != keys[1]  # same pixels, same key
    changed = images[0].clone()
    changed[0, 0, 0] += 1e-6
    assert image_digest(changed) != keys[0]
    assert image_digest(images[0].double()) != keys[0]  # the dtype is part of the digest
    assert torch.equal(collate(list(cached))["image_key"], torch.stack(keys))
    assert "image_key" not in collate(samples)  # samples computed on the fly (augmented) have none


@pytest.mark.slow  # inductor compiles C++ on the first step: about a minute on 2 cores with a cold cache
def test_compile_option_trains_the_same_model():
    plain, compiled = module_for("lora"), module_for("lora", "model.compile=true")
    loss, grads = train_step(plain)
    compiled_loss, compiled_grads = train_step(compiled)
    assert torch.allclose(loss, compiled_loss, atol=1e-5)
    assert all(torch.allclose(grads[n], compiled_grads[n], atol=1e-5) for n in grads)
    assert compiled.model.state_dict().keys() == plain.model.state_dict().keys()


def reference_attention(q, k, v, bias, p, drop):
    """The plain formula with a given drop mask: what the blockwise function must equal."""
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias).softmax(-1)
    return (probs * ~drop / (1 - p)) @ v


@pytest.mark.parametrize(("n", "block", "mask_kind"), [(37, 8, "bool"), (37, 64, "float"), (16, 5, "none")])
def test_blockwise_dropout_attention_equals_the_formula_with_the_same_mask(n, block, mask_kind):
    from src.models.dropout_attention import drop_mask, dropout_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    padded = torch.zeros(2, n, dtype=torch.bool)
    padded[1, n // 2 :] = True
    bias = torch.zeros(2, 1, 1, n, dtype=torch.float64)
    if mask_kind == "bool":
        bias = bias.masked_fill(padded[:, None, None], float("-inf"))
    elif mask_kind == "float":  # the official +1 on padded keys' logits
        bias = padded[:, None, None].double()
    drop = drop_mask((2, 3, n, n), 0.3, q.device)
    out = dropout_attention(q, k, v, bias, 0.3, block=block, drop=drop)
    expected = reference_attention(q, k, v, bias, 0.3, drop)
    assert torch.allclose(out, expected, atol=1e-10)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got, want, strict=True))


def test_drop_mask_drops_each_weight_with_probability_p():
    from src.models.dropout_attention import drop_mask, dropout_attention

    torch.manual_seed(0)
    assert abs(drop_mask((1000, 1000), 0.1, torch.device("cpu")).float().mean().item() - 0.1) < 2e-3
    assert abs(drop_mask((1000, 1000), 0.5, torch.device("cpu")).float().mean().item() - 0.5) < 2e-3
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="0 < p < 1"):
        dropout_attention(q, q, q, torch.zeros(1, 1, 1, 4), 0.0)


def test_fusion_layer_trains_with_blockwise_dropout_attention_on_cpu():
    """Dropout draws differ from PyTorch's, so the layer is compared with itself: expectation over masks."""
    from src.models.fusion import FusionLayer

    torch.manual_seed(0)
    layer = FusionLayer(32, 4, 64, dropout=0.2)
    x, pos = torch.randn(2, 30, 32), torch.randn(1, 30, 32)
    padding = torch.zeros(2, 30, dtype=torch.bool)
    padding[0, 20:] = True
    layer.eval()
    plain = layer.attend(x + pos, x, padding)
    layer.train()
    draws = torch.stack([layer.attend(x + pos, x, padding) for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])  # dropout is on
    assert torch.allclose(draws.mean(0), plain, atol=0.02)  # unbiased: the mean over masks is the plain output
    torch.manual_seed(3)
    first = layer.attend(x + pos, x, padding)
    torch.manual_seed(3)
    assert torch.equal(first, layer.attend(x + pos, x, padding))  # masks come from the default generator


def test_cpu_dropout_is_unbiased_and_drops_p():
    from src.models.dropout_attention import dropout

    torch.manual_seed(0)
    x = torch.ones(500, 400)
    out = dropout(x, 0.1, training=True)
    assert abs((out == 0).float().mean().item() - 0.1) < 3e-3 and abs(out.mean().item() - 1) < 0.01
    assert torch.equal(out.unique(), torch.tensor([0.0, 1 / 0.9]))
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x


def test_blockwise_dropout_attention_in_bf16_stays_close_to_fp32():
    """Under bf16 autocast the fusion passes bf16 q, k, v: softmax and sums still run in fp32."""
    from src.models.dropout_attention import drop_mask, dropout_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 40, 8, generator=g) for _ in range(3))
    bias = torch.zeros(2, 1, 1, 40).masked_fill(torch.arange(40) >= 30, float("-inf"))
    drop = drop_mask((2, 2, 40, 40), 0.1, q.device)
    halves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = dropout_attention(*halves, bias, 0.1, block=16, drop=drop)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference_attention(q, k, v, bias, 0.1, drop), atol=0.05)
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all() for t in halves)
