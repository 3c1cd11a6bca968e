"""Batching captioned images and drawing one caption per image per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def collate_captioned_images(items: Sequence[dict]) -> dict:
    """Batch items of any lgvq data set (``ShapesDataset``, folder data sets).

    Args:
        items: dicts with "image" float [3, H, W] (all the same shape), "captions" list[str],
            "attributes" (any object or None) and "index" int.

    Returns:
        dict with "image" float [B, 3, H, W], "captions" list (length B) of list[str],
        "attributes" list (length B), "index" int64 [B].
    """
    if len(items) == 0:
        raise ValueError("collate_captioned_images got an empty batch")
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) != 1:
        raise ValueError(f"all images of a batch must have one shape, got shapes {sorted(shapes)}")
    return {
        "image": torch.stack([item["image"] for item in items]),
        "captions": [list(item["captions"]) for item in items],
        "attributes": [item["attributes"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
    }


def draw_one_caption_per_image(
    captions: Sequence[Sequence[str]], generator: torch.Generator | None = None
) -> list[str]:
    """Pick one caption uniformly at random per image (the method draws one per image per step).

    Args:
        captions: per image, its non-empty list of captions (``batch["captions"]``).
        generator: a CPU ``torch.Generator``; seed it for reproducible draws. None uses torch's
            global generator.

    Returns:
        list[str], one caption per image. Call this in the training loop (main process), not in
        DataLoader workers, so that one seeded generator drives the whole run.
    """
    counts = torch.tensor([len(options) for options in captions], dtype=torch.float64)
    if len(captions) and bool((counts == 0).any()):
        empty = [position for position, options in enumerate(captions) if len(options) == 0]
        raise ValueError(f"captions: images at batch positions {empty} have no caption")
    uniform = torch.rand(len(captions), generator=generator, dtype=torch.float64)
    choices = torch.minimum((uniform * counts).long(), counts.long() - 1).tolist()
    return [options[choice] for options, choice in zip(captions, choices)]
