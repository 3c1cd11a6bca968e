"""LG-VQ's Relationship Alignment Module (docs/method.md): word-to-word relations of the text
transferred to the codes aligned with each word, through the fused relation_alignment_loss op.
"""

from __future__ import annotations

from torch import Tensor, nn

import lgvq_kernels


class RelationAlignmentHead(nn.Module):
    """g = Linear(D → C) → GELU → LayerNorm projects the straight-through codes to the text
    width; the loss compares the normalised Gram matrix of the codes aligned to each word with
    the Gram matrix of the words (see lgvq_kernels.relation_alignment_loss).

    forward(word_features ``[B, T, C]``, word_mask bool ``[B, T]``, visual_tokens ``[B, M, C]``
    (Zvt without CLS), codes ``[B, M, D]`` (zq_st)) → (loss 0-d, chosen int64 ``[B, T]``).
    """

    def __init__(self, code_dim: int, text_width: int, backend: str = "auto"):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(code_dim, text_width), nn.GELU(),
                                     nn.LayerNorm(text_width))
        self.backend = backend

    def forward(self, word_features: Tensor, word_mask: Tensor, visual_tokens: Tensor,
                codes: Tensor) -> tuple[Tensor, Tensor]:
        projected = self.project(codes)
        result = lgvq_kernels.relation_alignment_loss(
            word_features, visual_tokens, projected, word_mask, backend=self.backend)
        return result.loss, result.chosen
