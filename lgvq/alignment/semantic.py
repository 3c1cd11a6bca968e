"""LG-VQ's Semantic Alignment Module (docs/method.md): the visual-token encoder, global
semantic alignment (InfoNCE image→text) and masked text prediction (masked decoder + MLM head
tied to the frozen text encoder's token-embedding table).

Shapes: B images, M = h*w visual tokens, D code width, C text-token width, G global text
width, T text length (the encoder's max_length), V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgvq.alignment.layers import PostNormDecoderLayer, PreNormBlock


class VisualTokenEncoder(nn.Module):
    """f_vt: zq_st ``[B, M, D]`` → Zvt ``[B, M + 1, C]`` (index 0 is e_CLS).

    A learned CLS token is prepended, learned positions added, ``depth`` pre-LN blocks (width
    ``width``, ``heads`` heads, MLP ×4), a final LayerNorm and a bias-free linear map to the text
    width. A linear input map is added when D != width.
    """

    def __init__(self, code_dim: int, num_tokens: int, text_width: int, width: int | None = None,
                 depth: int = 2, heads: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        width = width or code_dim
        self.input = nn.Identity() if width == code_dim else nn.Linear(code_dim, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.positions = nn.Parameter(torch.zeros(1, num_tokens + 1, width))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList([PreNormBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.to_text = nn.Linear(width, text_width, bias=False)
        self.num_tokens = num_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"tokens must be [B, {self.num_tokens}, D], got {tuple(tokens.shape)}")
        h = self.input(tokens)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.positions
        for block in self.blocks:
            h = block(h)
        return self.to_text(self.norm(h))


def global_semantic_alignment_loss(image_embedding: Tensor, text_embedding: Tensor,
                                   temperature: float) -> Tensor:
    """InfoNCE image→text with in-batch negatives.

    image_embedding ``[B, G]`` (e_CLS mapped to the global width), text_embedding ``[B, G]``
    (e_EOT / pooled sentence feature; detached here: the text side is a fixed target).
    L = mean_i -log softmax_j(u_i·v_j / temperature)_i with u, v unit-normalised.
    """
    u = F.normalize(image_embedding, dim=-1)
    v = F.normalize(text_embedding.detach(), dim=-1)
    logits = u @ v.t() / temperature
    return F.cross_entropy(logits, torch.arange(u.shape[0], device=u.device))


def draw_mask_ratio(generator: torch.Generator | None = None, mean: float = 0.5,
                    std: float = 0.1, low: float = 0.1, high: float = 0.3) -> float:
    """One masking ratio per batch: normal(mean, std) clipped to [low, high] (the public code's
    values: in practice mostly 0.3)."""
    ratio = mean + std * float(torch.randn((), generator=generator))
    return min(max(ratio, low), high)


class MaskedTextDecoder(nn.Module):
    """Masked text prediction decoder: text slots (masked slots replaced by a learned
    per-position mask embedding, padding zeroed) attend to themselves and to all Zvt tokens.

    token_features ``[B, T, C]``, masked bool ``[B, T]``, attention_mask bool ``[B, T]``,
    visual_tokens ``[B, M + 1, C]`` → hidden ``[B, T, C]``.
    """

    def __init__(self, width: int, max_length: int, depth: int = 2, heads: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.zeros(1, max_length, width))
        nn.init.normal_(self.mask_embedding, std=0.02)
        self.layers = nn.ModuleList([PostNormDecoderLayer(width, heads, dropout=dropout)
                                     for _ in range(depth)])

    def forward(self, token_features: Tensor, masked: Tensor, attention_mask: Tensor,
                visual_tokens: Tensor) -> Tensor:
        length = token_features.shape[1]
        slots = torch.where(masked[..., None], self.mask_embedding[:, :length].to(token_features),
                            token_features)
        slots = slots * attention_mask[..., None].to(slots.dtype)
        padding = ~attention_mask
        for layer in self.layers:
            slots = layer(slots, visual_tokens, target_padding_mask=padding)
        return slots


class MaskedWordHead(nn.Module):
    """MLM head tied to the frozen token-embedding table E ``[V, C_emb]``:
    logits = LayerNorm(GELU(W h)) · Eᵀ + b, h ``[..., C]`` → ``[..., V]``."""

    def __init__(self, width: int, token_embedding: Tensor):
        super().__init__()
        vocab, embedding_width = token_embedding.shape
        self.transform = nn.Linear(width, embedding_width)
        self.norm = nn.LayerNorm(embedding_width)
        self.register_buffer("token_embedding", token_embedding.detach().clone(), persistent=False)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden: Tensor) -> Tensor:
        h = self.norm(F.gelu(self.transform(hidden)))
        return h @ self.token_embedding.t().to(h.dtype) + self.bias


def masked_word_loss(word_head: MaskedWordHead, hidden: Tensor, target_ids: Tensor,
                     masked: Tensor, label_smoothing: float) -> Tensor:
    """Cross-entropy with label smoothing of the word head's predictions at the masked slots.

    hidden ``[B, T, C]`` (the masked text decoder's output), target_ids int64 ``[B, T]``, masked
    bool ``[B, T]``. The vocabulary projection runs only at the masked slots (``[masked, V]``,
    not ``[B, T, V]``). With nothing masked the loss is zero, kept in the graph of ``hidden`` so
    that the decoder still receives a (zero) gradient, as on any other step.
    """
    if not bool(masked.any()):
        return hidden.sum() * 0.0
    logits = word_head(hidden[masked])
    return F.cross_entropy(logits, target_ids[masked], label_smoothing=label_smoothing)
