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

    target ``[B k, T, width]``, memory ``[B, S, width]`` → ``[B k, T, width]``: ``k`` targets
    per memory, image-major. Cross-attention scores each query on its own, so the ``k`` targets
    of one memory attend to it as one sequence of ``k T`` queries: the memory's keys and values
    are projected once, not ``k`` times (the same values as repeating the memory).
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
                causal_mask: Tensor | None = None,
                query_index: Tensor | None = None) -> Tensor:
        """``query_index`` int64 ``[B k, Q]``: compute the layer's output only at these target
        slots (``[B k, Q, width]``; every slot still serves as a key and value of the
        self-attention). A last layer whose output is read at a few slots needs no more."""
        keys = target
        if query_index is not None:
            if causal_mask is not None:
                raise ValueError("query_index does not take a causal_mask")
            target = target.gather(1, query_index[..., None].expand(-1, -1, target.shape[-1]))
        h, _ = self.self_attention(target, keys, keys, key_padding_mask=target_padding_mask,
                                   attn_mask=causal_mask, need_weights=False)
        target = self.norms[0](target + self.dropout(h))
        rows, length, width = target.shape
        memories = memory.shape[0]
        queries = target
        if rows != memories:
            if memories == 0 or rows % memories:
                raise ValueError(f"target: expected a whole number of sequences per memory, "
                                 f"got {rows} for {memories}")
            queries = target.reshape(memories, rows // memories * length, width)
        h, _ = self.cross_attention(queries, memory, memory,
                                    key_padding_mask=memory_padding_mask, need_weights=False)
        target = self.norms[1](target + self.dropout(h.reshape(rows, length, width)))
        return self.norms[2](target + self.dropout(self.mlp(target)))
