"""The code transformer: a GPT-style stack over code sequences (torch SDPA), shared by every
generation task.

Input sequence: an optional prefix of condition tokens (a class, a segmentation label per code
cell, a start token), then the codes in raster order. Optional cross-attention reads the frozen
text encoder's token features (text-to-image). ``causal=True`` is the autoregressive model
(unconditional generation, completion, semantic synthesis), with a KV cache for sampling;
``causal=False`` is the bidirectional masked-token model (MaskGIT) with one extra [MASK] code.

Code embeddings (``embedding``):

* ``codebook`` (the default): the tokenizer's frozen codebook ``[K, D]`` (what its decoder
  reads) through a trained ``Linear(D, width)``, plus a learned per-code offset initialised at
  zero. At step 0 two codes the tokenizer placed close are close to the transformer too: that
  is what LG-VQ claims to improve (codes aligned with text), so the downstream comparison reads
  the codebook's geometry as well as its index statistics, as the paper's downstream models
  (which embed codes from the codebook) do.
* ``learned``: a plain ``nn.Embedding(K, width)``: the index statistics only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDINGS = ("codebook", "learned")


@dataclass
class TransformerShape:
    """The sizes of a ``CodeTransformer`` (saved in its checkpoint's config)."""

    codebook_size: int  # K: code indices 0..K-1 (a bidirectional model adds [MASK] = K)
    length: int  # codes per sequence (h * w)
    prefix_length: int = 0  # condition tokens before the codes
    condition_vocab: int = 1  # distinct condition tokens
    width: int = 128
    layers: int = 4
    heads: int = 4
    dropout: float = 0.0
    causal: bool = True
    context_width: int = 0  # width of cross-attended features; 0 = no cross-attention


class KVCache:
    """Keys and values of the positions already processed, per layer (self-attention), and the
    cross-attention keys/values of the context (computed once)."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.context: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, size = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * size)


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, MLP (GELU, 4x)."""

    def __init__(self, shape: TransformerShape):
        super().__init__()
        width = shape.width
        self.heads, self.dropout, self.causal = shape.heads, shape.dropout, shape.causal
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.cross = shape.context_width > 0
        if self.cross:
            self.norm_cross = nn.LayerNorm(width)
            self.cross_q = nn.Linear(width, width)
            self.cross_kv = nn.Linear(shape.context_width, 2 * width)
            self.cross_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width), nn.Dropout(shape.dropout))

    def _self_attention(self, x, index, cache):
        q, k, v = _split_heads(self.qkv(self.norm1(x)), self.heads * 3).chunk(3, dim=1)
        new = x.shape[1]
        if cache is not None:
            if index in cache.keys:
                k = torch.cat([cache.keys[index], k], dim=2)
                v = torch.cat([cache.values[index], v], dim=2)
            cache.keys[index], cache.values[index] = k, v
        total = k.shape[2]
        mask, is_causal = None, False
        if self.causal and new == total:
            is_causal = True
        elif self.causal and new > 1:  # a block of new positions after cached ones
            query_positions = torch.arange(total - new, total, device=x.device)[:, None]
            mask = torch.arange(total, device=x.device)[None, :] <= query_positions
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  is_causal=is_causal)
        return self.out(_merge_heads(attended))

    def _cross_attention(self, x, index, context, context_mask, cache):
        if cache is not None and index in cache.context:
            k, v = cache.context[index]
        else:
            k, v = _split_heads(self.cross_kv(context), self.heads * 2).chunk(2, dim=1)
            if cache is not None:
                cache.context[index] = (k, v)
        q = _split_heads(self.cross_q(self.norm_cross(x)), self.heads)
        mask = None if context_mask is None else context_mask[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.cross_out(_merge_heads(attended))

    def forward(self, x, index, context=None, context_mask=None, cache=None):
        x = x + self._self_attention(x, index, cache)
        if self.cross:
            x = x + self._cross_attention(x, index, context, context_mask, cache)
        return x + self.mlp(self.norm2(x))


class CodeEmbedding(nn.Module):
    """Code index -> ``width`` vector, ``codebook`` or ``learned`` (see the module docstring);
    ``extra`` more indices after the K codes (e.g. [MASK]) read a zero code vector plus their
    learned offset."""

    def __init__(self, codebook_size: int, width: int, codebook: torch.Tensor | None,
                 embedding: str = "codebook", extra: int = 0):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        self.embedding = embedding
        vocab = codebook_size + extra
        if embedding == "codebook":
            if codebook is None or codebook.dim() != 2 or codebook.shape[0] != codebook_size:
                raise ValueError(f"embedding=codebook needs the codebook [K={codebook_size}, D], "
                                 f"got {None if codebook is None else tuple(codebook.shape)}")
            table = codebook.detach().float()
            self.register_buffer("codebook", torch.cat([table, table.new_zeros(extra,
                                                                               table.shape[1])]))
            self.project = nn.Linear(codebook.shape[1], width)
            self.code_offset = nn.Embedding(vocab, width)  # learned residual, starts at 0
            nn.init.zeros_(self.code_offset.weight)
        else:
            self.code_table = nn.Embedding(vocab, width)
            nn.init.normal_(self.code_table.weight, std=0.02)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if self.embedding == "learned":
            return self.code_table(codes)
        table = self.project(self.codebook.to(self.project.weight.dtype))
        return table[codes] + self.code_offset(codes)


class CodeTransformer(nn.Module):
    """GPT-style transformer over [condition prefix] + codes.

    Args:
        shape: the sizes (``TransformerShape``).
        codebook: float ``[K, D]``, the tokenizer's codebook; needed for
            ``embedding="codebook"`` (stored as a frozen buffer).
        embedding: ``codebook`` (default) or ``learned`` (see the module docstring).
    """

    def __init__(self, shape: TransformerShape, codebook: torch.Tensor | None = None,
                 embedding: str = "codebook"):
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if shape.width % shape.heads:
            raise ValueError(f"width ({shape.width}) must be a multiple of heads ({shape.heads})")
        self.shape, self.embedding = shape, embedding
        vocab = shape.codebook_size + (0 if shape.causal else 1)  # [MASK] = K when bidirectional
        self.mask_id = shape.codebook_size
        self.codes = CodeEmbedding(shape.codebook_size, shape.width, codebook, embedding,
                                   extra=vocab - shape.codebook_size)
        self.condition = nn.Embedding(max(shape.condition_vocab, 1), shape.width)
        nn.init.normal_(self.condition.weight, std=0.02)
        self.positions = nn.Parameter(torch.zeros(shape.prefix_length + shape.length,
                                                  shape.width))
        nn.init.normal_(self.positions, std=0.02)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.layers))
        self.norm = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, shape.codebook_size)
        if shape.context_width:
            # classifier-free guidance's "no text": one learned context token
            self.null_context = nn.Parameter(torch.zeros(1, 1, shape.context_width))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codes(codes)

    def embed(self, prefix: torch.Tensor | None, codes: torch.Tensor | None,
              start: int = 0) -> torch.Tensor:
        """Embeddings of the positions ``start..`` of [prefix] + codes, positions added."""
        parts = []
        if prefix is not None and prefix.shape[1]:
            parts.append(self.condition(prefix))
        if codes is not None and codes.shape[1]:
            parts.append(self.embed_codes(codes))
        x = torch.cat(parts, dim=1)
        return x + self.positions[start:start + x.shape[1]]

    def run(self, x: torch.Tensor, context=None, context_mask=None,
            cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states ``[B, n, width]`` -> code logits ``[B, n, K]``; with ``cache``, ``x``
        holds only the positions after the cached ones."""
        for index, block in enumerate(self.blocks):
            x = block(x, index, context, context_mask, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return self.head(self.norm(x))

    def check_inputs(self, prefix, codes):
        if prefix is not None and prefix.shape[1] != self.shape.prefix_length:
            raise ValueError(f"prefix must have {self.shape.prefix_length} tokens, got "
                             f"{tuple(prefix.shape)}")
        if codes.dim() != 2 or codes.shape[1] > self.shape.length:
            raise ValueError(f"codes must be [B, <= {self.shape.length}], got "
                             f"{tuple(codes.shape)}")

    def forward(self, prefix: torch.Tensor | None, codes: torch.Tensor, context=None,
                context_mask=None) -> torch.Tensor:
        """Training logits ``[B, L, K]``.

        causal: logits[:, i] predict codes[:, i] from the prefix and codes[:, :i] (the prefix
        must hold at least one token, e.g. a start token). bidirectional: logits of every
        position of ``codes`` (which holds [MASK] where unknown).
        """
        self.check_inputs(prefix, codes)
        if self.shape.causal:
            logits = self.run(self.embed(prefix, codes[:, :-1]), context, context_mask)
            return logits[:, self.shape.prefix_length - 1:]
        logits = self.run(self.embed(prefix, codes), context, context_mask)
        return logits[:, self.shape.prefix_length:]

    def null_context_like(self, context: torch.Tensor, context_mask: torch.Tensor):
        """The "no text" context of classifier-free guidance, shaped like ``context``: the
        learned null token first, every other position masked out."""
        null = torch.zeros_like(context)
        null[:, :1] = self.null_context.to(context.dtype)
        mask = torch.zeros_like(context_mask)
        mask[:, 0] = True
        return null, mask


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cosine_mask_ratio(progress: torch.Tensor | float) -> torch.Tensor | float:
    """MaskGIT's schedule: the fraction of codes still masked at ``progress`` in [0, 1]."""
    if isinstance(progress, torch.Tensor):
        return torch.cos(progress * (math.pi / 2))
    return math.cos(progress * math.pi / 2)


__all__ = ["CodeEmbedding", "CodeTransformer", "EMBEDDINGS", "KVCache", "TransformerShape", "cosine_mask_ratio",
           "parameter_count"]
