"""LG-VQ's language-alignment heads: semantic alignment (global InfoNCE + masked text
prediction) and relationship alignment."""

from lgvq.alignment.relation import RelationAlignmentHead
from lgvq.alignment.semantic import (
    MaskedTextDecoder,
    MaskedWordHead,
    VisualTokenEncoder,
    draw_mask_ratio,
    global_semantic_alignment_loss,
    masked_word_loss,
)

__all__ = [
    "MaskedTextDecoder",
    "MaskedWordHead",
    "RelationAlignmentHead",
    "VisualTokenEncoder",
    "draw_mask_ratio",
    "global_semantic_alignment_loss",
    "masked_word_loss",
]
