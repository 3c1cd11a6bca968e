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


def draw_captions_per_image(
    captions: Sequence[Sequence[str]], per_image: int, generator: torch.Generator | None = None
) -> list[str]:
    """Pick ``per_image`` captions per image, image-major (image 0's captions, then image 1's).

    An image with at least ``per_image`` captions gives distinct ones, in a random order; one
    with fewer gives all of them, then repeats drawn uniformly. ``per_image=1`` is exactly
    :func:`draw_one_caption_per_image` (the same draws for the same generator).

    Returns:
        list[str] of ``len(captions) * per_image`` captions.
    """
    if isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1:
        raise ValueError(f"per_image must be a positive integer, got {per_image!r}")
    if per_image == 1:
        return draw_one_caption_per_image(captions, generator)
    empty = [position for position, options in enumerate(captions) if len(options) == 0]
    if empty:
        raise ValueError(f"captions: images at batch positions {empty} have no caption")
    drawn: list[str] = []
    for options in captions:
        order = torch.randperm(len(options), generator=generator).tolist()
        while len(order) < per_image:  # fewer captions than asked: repeat some
            order.append(int(torch.randint(len(options), (1,), generator=generator)))
        drawn.extend(options[choice] for choice in order[:per_image])
    return drawn
