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

    As the official code: a learned CLS token is prepended and learned positions added (both
    initialised with std 0.01), a LayerNorm ``ln_pre``, ``depth`` pre-LN blocks (width
    ``width``, ``heads`` heads, MLP ×4 with QuickGELU), a final LayerNorm and a bias-free linear
    map to the text width (std 0.01). A linear input map is added when D != width.
    """

    def __init__(self, code_dim: int, num_tokens: int, text_width: int, width: int | None = None,
                 depth: int = 2, heads: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        width = width or code_dim
        self.input = nn.Identity() if width == code_dim else nn.Linear(code_dim, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.positions = nn.Parameter(torch.zeros(1, num_tokens + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList([PreNormBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.to_text = nn.Linear(width, text_width, bias=False)
        for parameter in (self.cls_token, self.positions, self.to_text.weight):
            nn.init.normal_(parameter, std=0.01)
        self.num_tokens = num_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 3 or tokens.shape[1] != self.num_tokens:
            raise ValueError(f"tokens must be [B, {self.num_tokens}, D], got {tuple(tokens.shape)}")
        h = self.input(tokens)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.positions
        h = self.ln_pre(h)
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
    """One masking ratio per batch, drawn as the official code does: a normal(mean, std)
    truncated to [low, high] (scipy's ``truncnorm``), here by inverting the normal CDF on a
    uniform draw between the bounds' CDF values. With the defaults the mean is about 0.263;
    clipping instead would give ``high`` in 98 % of the batches."""
    if not low < high or std <= 0:
        raise ValueError(f"need low < high and std > 0, got low={low}, high={high}, std={std}")
    lower, upper = (torch.tensor([low, high], dtype=torch.float64) - mean) / std
    cdf_low, cdf_high = torch.special.ndtr(lower), torch.special.ndtr(upper)
    uniform = torch.rand((), generator=generator, dtype=torch.float64)
    ratio = mean + std * float(torch.special.ndtri(cdf_low + uniform * (cdf_high - cdf_low)))
    return min(max(ratio, low), high)  # guards the float rounding at the bounds only


class MaskedTextDecoder(nn.Module):
    """Masked text prediction decoder: text slots (masked slots replaced by a learned
    per-position mask embedding, std 0.01, padding zeroed) attend to themselves and to all Zvt
    tokens, through ``depth`` post-LN layers with a ×1 ReLU feed-forward (the official code).

    token_features ``[B k, T, C]``, masked bool ``[B k, T]``, attention_mask bool ``[B k, T]``,
    visual_tokens ``[B, M + 1, C]`` → hidden ``[B k, T, C]``: ``k`` captions per image,
    image-major, all reading their image's tokens (one memory, not ``k`` copies of it).
    """

    def __init__(self, width: int, max_length: int, depth: int = 2, heads: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.zeros(1, max_length, width))
        nn.init.normal_(self.mask_embedding, std=0.01)
        self.layers = nn.ModuleList([PostNormDecoderLayer(width, heads, dropout=dropout)
                                     for _ in range(depth)])

    def forward(self, token_features: Tensor, masked: Tensor, attention_mask: Tensor,
                visual_tokens: Tensor, only_masked: bool = False) -> Tensor:
        """``only_masked``: the last layer runs only at the masked slots (the only ones the word
        head reads): the same values there, zeros at the other slots. On captioned shapes
        (a few masked of 30 slots) it took the demo's LG-VQ step, one caption per image and
        2 layers, from 1.64x to 1.48x the step without language losses (2 CPU threads)."""
        length = token_features.shape[1]
        slots = torch.where(masked[..., None], self.mask_embedding[:, :length].to(token_features),
                            token_features)
        slots = slots * attention_mask[..., None].to(slots.dtype)
        padding = ~attention_mask
        last = len(self.layers) - 1 if only_masked else len(self.layers)
        for layer in self.layers[:last]:
            slots = layer(slots, visual_tokens, target_padding_mask=padding)
        if last == len(self.layers):
            return slots
        # the masked slots of each row first (a stable sort keeps their order), as many
        # columns as the row with the most; the extra columns of other rows are dropped
        counts = masked.sum(1)
        columns = max(int(counts.max()) if counts.numel() else 0, 1)
        index = torch.argsort((~masked).to(torch.int8), dim=1, stable=True)[:, :columns]
        keep = torch.arange(columns, device=masked.device) < counts[:, None]
        out = self.layers[last](slots, visual_tokens, target_padding_mask=padding,
                                query_index=index)
        out = out * keep[..., None].to(out.dtype)
        return slots.new_zeros(slots.shape).scatter(
            1, index[..., None].expand(-1, -1, slots.shape[-1]), out)


class MaskedWordHead(nn.Module):
    """MLM head tied to the frozen token-embedding table E ``[V, C_emb]``:
    logits = LayerNorm(GELU(W h)) · E_vᵀ + b, h ``[..., C]`` → ``[..., V']``.

    ``vocabulary`` (int64 ``[V']``, sorted distinct token ids) restricts the head to the words
    a data set uses: E_v gathers those rows of E, logit ``j`` scores token ``vocabulary[j]``.
    On captioned shapes that is 62 of MiniLM's 30,522 ids, which makes the projection ~500x
    cheaper and the softmax compete only among words that can occur. None keeps the whole
    vocabulary (open-vocabulary data). ``targets(ids)`` maps token ids to logit indices
    (-100, cross-entropy's ignore index, for an id outside the vocabulary) and ``token_ids``
    maps predicted indices back.
    """

    def __init__(self, width: int, token_embedding: Tensor, vocabulary: Tensor | None = None):
        super().__init__()
        full_size, embedding_width = token_embedding.shape
        if vocabulary is None:
            vocabulary = torch.arange(full_size)
        vocabulary = torch.as_tensor(vocabulary, dtype=torch.int64).flatten()
        if vocabulary.numel() == 0 or not bool((vocabulary[1:] > vocabulary[:-1]).all()):
            raise ValueError("vocabulary must hold sorted, distinct token ids (at least one)")
        if int(vocabulary[0]) < 0 or int(vocabulary[-1]) >= full_size:
            raise ValueError(f"vocabulary ids must lie in [0, {full_size}), got "
                             f"[{int(vocabulary[0])}, {int(vocabulary[-1])}]")
        self.transform = nn.Linear(width, embedding_width)
        self.norm = nn.LayerNorm(embedding_width)
        self.register_buffer("token_embedding", token_embedding.detach()[vocabulary].clone(),
                             persistent=False)
        self.register_buffer("vocabulary", vocabulary.clone())
        index_of_id = torch.full((full_size,), -100, dtype=torch.int64)
        index_of_id[vocabulary] = torch.arange(vocabulary.numel())
        self.register_buffer("index_of_id", index_of_id, persistent=False)
        self.bias = nn.Parameter(torch.zeros(vocabulary.numel()))

    def forward(self, hidden: Tensor) -> Tensor:
        h = self.norm(F.gelu(self.transform(hidden)))
        return h @ self.token_embedding.t().to(h.dtype) + self.bias

    def targets(self, token_ids: Tensor) -> Tensor:
        """Token ids → logit indices (-100 for ids outside the vocabulary)."""
        return self.index_of_id[token_ids]

    def token_ids(self, indices: Tensor) -> Tensor:
        """Logit indices (e.g. an argmax) → token ids."""
        return self.vocabulary[indices]


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
    targets = word_head.targets(target_ids[masked])
    if not bool((targets >= 0).any()):  # every masked word lies outside the head's vocabulary
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
