"""The vision-language fusion transformer (DETR-style, post-norm) and the box head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from src.models.dropout_attention import dropout, dropout_attention


class FusionLayer(nn.Module):
    """Post-norm self-attention layer; the position embedding is added to queries and keys only."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def attend(self, qk: torch.Tensor, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """`self_attn(qk, qk, x)` computed with fused `scaled_dot_product_attention`, in training too.

        The weights stay those of the nn.MultiheadAttention (so checkpoints and the official key mapping
        are unchanged); nn.MultiheadAttention itself only takes its fused path in inference. Training with
        attention dropout on CPU goes through `dropout_attention` (src/models/dropout_attention.py).
        """
        attn = self.self_attn
        b, n, d = x.shape
        heads = attn.num_heads
        q, k = F.linear(qk, attn.in_proj_weight[: 2 * d], attn.in_proj_bias[: 2 * d]).chunk(2, dim=-1)
        v = F.linear(x, attn.in_proj_weight[2 * d :], attn.in_proj_bias[2 * d :])
        q, k, v = (t.view(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        p = attn.dropout if self.training else 0.0  # not `dropout`: that is the module-level function
        if p and q.device.type == "cpu":  # fused CPU attention has no dropout: blockwise instead
            bias = key_padding_mask[:, None, None, :].float()
            if key_padding_mask.dtype == torch.bool:
                bias = torch.zeros_like(bias).masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
            out = dropout_attention(q, k, v, bias, p)
        else:
            if key_padding_mask.dtype == torch.bool:
                mask = ~key_padding_mask[:, None, None, :]  # True = attend
            else:  # a float mask is added to the logits, as nn.MultiheadAttention does
                mask = key_padding_mask[:, None, None, :].to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        attended = self.attend(x + pos, x, key_padding_mask)
        x = self.norm1(x + dropout(attended, self.dropout1.p, self.training))
        ffn = self.linear2(dropout(F.relu(self.linear1(x)), self.dropout.p, self.training))
        return self.norm2(x + dropout(ffn, self.dropout2.p, self.training))


class FusionEncoder(nn.Module):
    """A stack of `FusionLayer`s over [REG] + text + visual tokens.

    `key_padding_mask` is either boolean (True = ignore that key) or float (added to the logits: the
    official code passes its 0/1 padding mask as float, which adds +1 instead of masking).
    """

    def __init__(self, dim: int = 256, heads: int = 8, ffn_dim: int = 2048, layers: int = 6, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(dim, heads, ffn_dim, dropout) for _ in range(layers))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos, key_padding_mask)
        return x


class BoxHead(nn.Module):
    """Three-layer MLP (ReLU between) from the [REG] state to a sigmoid (cx, cy, w, h) box.

    Always computed in fp32, outside any autocast: under bf16 a box in [0, 1] has a resolution of about
    2 px at 518, too coarse for the IoU that Acc@0.5 and the loss are computed on.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.layers = nn.ModuleList([nn.Linear(dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            for i, layer in enumerate(self.layers):
                x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
            return x.sigmoid()
