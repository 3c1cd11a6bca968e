"""Masking word tokens of tokenised captions: the masked-word task's input, in training and in
evaluation alike."""

from __future__ import annotations

import torch

__all__ = ["mask_word_tokens"]


def mask_word_tokens(
    ids: torch.Tensor,
    word_mask: torch.Tensor,
    mask_token_id: int,
    ratio: float | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace randomly chosen word tokens by ``mask_token_id``.

    Args:
        ids: int64 ``[B, T]`` token ids.
        word_mask: bool ``[B, T]``; the tokens that may be masked (real, non-special tokens).
        mask_token_id: the id written into masked slots.
        ratio: probability in [0, 1] with which each maskable token is masked, independently;
            a float, or a float tensor ``[B]`` (one ratio per caption).
        generator: source of randomness; the same generator state gives the same masks. Its
            device is used to draw the random numbers (they are then moved to ``ids.device``).
        count: instead of ``ratio``, mask exactly ``min(count, number of words)`` tokens per
            caption, chosen uniformly (for masked-word Recall@1 with 1 or 3 masked words).

    Returns:
        ``(masked_ids, masked_positions)``: int64 ``[B, T]`` ids with masked slots replaced, and
        bool ``[B, T]`` True where a token was masked (always a subset of ``word_mask``).
    """
    if (ratio is None) == (count is None):
        raise ValueError("give exactly one of ratio (a probability) and count (tokens per caption)")
    if ids.dim() != 2:
        raise ValueError(f"ids must have shape [B, T], got {tuple(ids.shape)}")
    if word_mask.shape != ids.shape:
        raise ValueError(
            f"word_mask must have the shape of ids {tuple(ids.shape)}, got {tuple(word_mask.shape)}"
        )
    word_mask = word_mask.to(device=ids.device, dtype=torch.bool)
    random_device = generator.device if generator is not None else ids.device
    uniform = torch.rand(ids.shape, generator=generator, device=random_device).to(ids.device)
    if ratio is not None:
        if isinstance(ratio, torch.Tensor):
            ratio = ratio.to(device=ids.device, dtype=torch.float32)
            if ratio.dim() == 1 and ratio.shape[0] == ids.shape[0]:
                ratio = ratio[:, None]
            elif ratio.dim() != 0:
                raise ValueError(
                    f"ratio must be a float or a tensor of shape [B]={ids.shape[0]}, "
                    f"got shape {tuple(ratio.shape)}"
                )
            if bool(((ratio < 0) | (ratio > 1)).any()):
                raise ValueError("ratio must lie in [0, 1]")
        elif not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
        masked_positions = word_mask & (uniform < ratio)
    else:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        # Rank the words of each caption by a random score; non-words sort last.
        scores = uniform.masked_fill(~word_mask, 2.0)
        rank = scores.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
        masked_positions = word_mask & (rank < count)
    masked_ids = ids.masked_fill(masked_positions, mask_token_id)
    return masked_ids, masked_positions
