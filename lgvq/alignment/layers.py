"""Transformer building blocks of LG-VQ's alignment heads: the visual-token encoder's pre-norm
block (CLIP's residual attention block) and the masked text decoder's post-norm layer, each as
the official LG-VQ code builds it (docs/method.md, "Heads as in the official code")."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP's blocks use."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class PreNormBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block: x + Attn(LN(x)), then x + MLP(LN(x)), the MLP
    ``mlp_ratio`` times wide with QuickGELU (CLIP's block, which the official visual-token
    encoder uses).

    x ``[B, S, width]`` → ``[B, S, width]``; ``key_padding_mask`` bool ``[B, S]`` (True = pad).
    """

    def __init__(self, width: int, heads: int = 1, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.attention_norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.mlp_norm = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), QuickGELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, width), nn.Dropout(dropout))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        h = self.attention_norm(x)
        h, _ = self.attention(h, h, h, key_padding_mask=key_padding_mask,
                              attn_mask=attention_mask, need_weights=False)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class PostNormDecoderLayer(nn.Module):
    """Post-LayerNorm transformer decoder layer (self-attention over the target with a padding
    mask, cross-attention to a memory, feed-forward), as the official masked text decoder:
    feed-forward ``ffn_ratio`` (1) times wide with ReLU, dropout on the residual branches only
    (none on the attention weights), LayerNorm eps 1e-12.

    target ``[B, T, width]``, memory ``[B, S, width]`` → ``[B, T, width]``.
    """

    def __init__(self, width: int, heads: int = 1, ffn_ratio: float = 1.0, dropout: float = 0.1,
                 eps: float = 1e-12):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        hidden = int(width * ffn_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, width))
        self.norms = nn.ModuleList([nn.LayerNorm(width, eps=eps) for _ in range(3)])
        self.dropout = nn.Dropout(dropout)

    def forward(self, target: Tensor, memory: Tensor,
                target_padding_mask: Tensor | None = None,
                memory_padding_mask: Tensor | None = None,
                causal_mask: Tensor | None = None) -> Tensor:
        h, _ = self.self_attention(target, target, target, key_padding_mask=target_padding_mask,
                                   attn_mask=causal_mask, need_weights=False)
        target = self.norms[0](target + self.dropout(h))
        h, _ = self.cross_attention(target, memory, memory, key_padding_mask=memory_padding_mask,
                                    need_weights=False)
        target = self.norms[1](target + self.dropout(h))
        return self.norms[2](target + self.dropout(self.mlp(target)))
