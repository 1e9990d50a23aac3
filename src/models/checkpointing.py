"""Activation checkpointing (`model.checkpointing`): blocks whose activations are recomputed in backward.

`frozen` (or `true`) checkpoints the backbone blocks without trainable parameters; `all` also the
adapted backbone blocks and the fusion layers. A recompute must see what the first forward saw and
leave no trace: the CLIP prior that DyPA reads from its slot is captured at forward time and put back
for the recompute, and the running statistics of BatchNorm layers inside the block (LoCA's) are
restored after it, so that they are updated once per step as without checkpointing. Dropout masks
repeat because checkpointing restores the RNG state. State-dict keys do not change.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from src.errors import ConfigError
from src.models.encoders import ConditionSlot

MODES = ("frozen", "all")


def checkpointing_mode(value: bool | str | None) -> str | None:
    """The configured `model.checkpointing` as None (off), "frozen" or "all"."""
    if value in (None, False, "none", "false"):
        return None
    if value is True or value == "true":
        return "frozen"
    if value in MODES:
        return str(value)
    raise ConfigError(f"model.checkpointing must be false, frozen (= true) or all, got {value!r}")


class RecomputeState:
    """Per checkpointed call: what the forward saw (slot values), replayed and cleaned up at recompute."""

    def __init__(self, block: nn.Module, slots: Sequence[ConditionSlot]) -> None:
        self.block, self.slots = block, slots
        self.seen: list[torch.Tensor | None] = []

    @contextmanager
    def forward(self) -> Iterator[None]:
        self.seen = [slot.value for slot in self.slots]
        yield

    @contextmanager
    def recompute(self) -> Iterator[None]:
        before = [slot.value for slot in self.slots]
        statistics = [(b, b.clone()) for m in self.block.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
        for slot, value in zip(self.slots, self.seen, strict=True):
            slot.value = value
        try:
            yield
        finally:
            for slot, value in zip(self.slots, before, strict=True):
                slot.value = value
            with torch.no_grad():
                for buffer, saved in statistics:
                    buffer.copy_(saved)

    def contexts(self) -> tuple[Any, Any]:
        return self.forward(), self.recompute()


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, through non-reentrant checkpointing while gradients are recorded."""
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    state = RecomputeState(self, self.checkpoint_slots)
    return checkpoint(forward, self, *args, use_reentrant=False, context_fn=state.contexts, **kwargs)


def checkpoint_blocks(
    blocks: dict[str, Sequence[nn.Module]], only_frozen: bool, slots: Sequence[ConditionSlot] = ()
) -> list[str]:
    """Checkpoint the blocks (with `only_frozen`, those without trainable parameters); their names."""
    chosen = []
    for name, modules in blocks.items():
        for index, block in enumerate(modules):
            if only_frozen and any(p.requires_grad for p in block.parameters()):
                continue
            block.checkpoint_slots = list(slots)
            block.forward = types.MethodType(_checkpointed_forward, block)  # bound: survives deepcopy
            chosen.append(f"{name}.{index}")
    return chosen

