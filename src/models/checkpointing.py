"""Activation checkpointing of the frozen backbone blocks (`model.checkpointing=true`).

A block with no trainable parameter of its own stores no activations for backward: its forward is
recomputed when the gradient passes through it. Blocks that hold trainable modules are left alone: a
LoCA BatchNorm would update its running statistics twice, and DyPA reads the CLIP prior from a slot
that is only filled during the forward pass. State-dict keys do not change.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, through non-reentrant checkpointing while gradients are recorded (the
    block's own `training` flag is off: frozen backbones run in eval mode)."""
    forward = type(self).forward
    if torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_frozen_blocks(blocks: dict[str, nn.ModuleList]) -> list[str]:
    """Checkpoint every block without trainable parameters; returns their names (`<backbone>.<index>`)."""
    chosen = []
    for backbone, modules in blocks.items():
        for index, block in enumerate(modules):
            if any(p.requires_grad for p in block.parameters()):
                continue
            block.forward = types.MethodType(_checkpointed_forward, block)  # bound: survives deepcopy
            chosen.append(f"{backbone}.{index}")
    return chosen
