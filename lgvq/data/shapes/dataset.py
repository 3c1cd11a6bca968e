"""Items of captioned shapes and the Dataset: everything about item ``index`` of ``split`` comes
from one numpy Generator keyed by ``(seed, split, index)``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from torch.utils.data import Dataset

from lgvq.data.images import image_array_to_tensor
from lgvq.data.shapes.captions import sample_captions
from lgvq.data.shapes.rendering import check_image_size, render_scene
from lgvq.data.shapes.scenes import (
    DEFAULT_RADII,
    SceneAttributes,
    check_object_range,
    check_radii,
    sample_scene,
)
from lgvq.data.shapes.vocabulary import MAX_OBJECTS

SPLIT_STREAMS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 50_000, "val": 2_000, "test": 2_000}
_SEED_DOMAIN_TAG = 0x5A4E5  # keeps these streams apart from other uses of (seed, ...) seeding


class CaptionedScene(NamedTuple):
    image: np.ndarray  # uint8 [image_size, image_size, 3]
    attributes: SceneAttributes
    captions: list[str]


def item_generator(seed: int, split: str, index: int) -> np.random.Generator:
    """The numpy Generator that defines item ``index`` of ``split`` under ``seed``.

    A Philox counter-based generator keyed directly by (seed, split, index): distinct triples
    are distinct keys, hence independent streams, with no hashing step (saves ~25 us/item).
    """
    if split not in SPLIT_STREAMS:
        raise ValueError(f"split must be one of {tuple(SPLIT_STREAMS)}, got {split!r}")
    if not 0 <= seed < 2**64 or not 0 <= index < 2**40:
        raise ValueError(
            f"need 0 <= seed < 2**64 and 0 <= index < 2**40, got seed={seed}, index={index}"
        )
    key = [int(seed), (_SEED_DOMAIN_TAG << 44) | (SPLIT_STREAMS[split] << 40) | int(index)]
    return np.random.Generator(np.random.Philox(key=key))


def generate_captioned_scene(
    seed: int,
    split: str,
    index: int,
    image_size: int = 64,
    captions_per_image: int = 5,
    min_objects: int = 1,
    max_objects: int = MAX_OBJECTS,
    radii: tuple[float, float] = DEFAULT_RADII,
) -> CaptionedScene:
    """Item ``index`` of ``split``: image uint8 [image_size, image_size, 3], attributes, captions.

    Attributes and captions do not depend on ``image_size``: the same scene renders at any size.
    """
    generator = item_generator(seed, split, index)
    scene = sample_scene(generator, min_objects, max_objects, radii)
    captions = sample_captions(scene, generator, captions_per_image)
    return CaptionedScene(render_scene(scene, image_size), scene, captions)


class ShapesDataset(Dataset):
    """The built-in captioned-shapes data set, generated on the fly.

    Args:
        split: "train", "val" or "test"; each split is its own seed stream (disjoint).
        size: number of items in the split (default: 50,000 train, 2,000 val, 2,000 test).
        image_size: side of the square images in pixels, 8..1024 (32..256 is the tested range).
        seed: data set seed; the same (seed, split, index) always gives the same item.
        captions_per_image: captions per item (>= 1); distinct templates come first.
        min_objects, max_objects: object count range, within 1..3.
        radii: (large, small) object circumradius as fractions of the image side (default
            0.13, 0.075); the demo draws larger objects (0.15, 0.10) so that a 32x32 tokenizer
            sees them over more pixels.

    Item: dict with
        "image": float32 [3, image_size, image_size] in [-1, 1],
        "captions": list[str] of length captions_per_image,
        "attributes": SceneAttributes (exact objects, relations, background),
        "index": int.
    Batch with ``collate_captioned_images``; draw the step's caption per image with
    ``draw_one_caption_per_image``.
    """

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        image_size: int = 64,
        seed: int = 0,
        captions_per_image: int = 5,
        min_objects: int = 1,
        max_objects: int = MAX_OBJECTS,
        radii: tuple[float, float] = DEFAULT_RADII,
    ):
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split must be one of {tuple(SPLIT_STREAMS)}, got {split!r}")
        size = DEFAULT_SPLIT_SIZES[split] if size is None else size
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size (number of items) must be a positive int, got {size!r}")
        check_image_size(image_size)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(
                f"captions_per_image must be a positive int, got {captions_per_image!r}"
            )
        check_object_range(min_objects, max_objects)
        self.split = split
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.captions_per_image = captions_per_image
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.radii = check_radii(radii)

    def __len__(self) -> int:
        return self.size

    def _check_index(self, index: int) -> int:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        return index

    def captions(self, index: int) -> list[str]:
        """The captions of item ``index`` without rendering its image (the same list as
        ``self[index]["captions"]``)."""
        index = self._check_index(index)
        generator = item_generator(self.seed, self.split, index)
        scene = sample_scene(generator, self.min_objects, self.max_objects, self.radii)
        return sample_captions(scene, generator, self.captions_per_image)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        item = generate_captioned_scene(
            self.seed,
            self.split,
            index,
            self.image_size,
            self.captions_per_image,
            self.min_objects,
            self.max_objects,
            self.radii,
        )
        return {
            "image": image_array_to_tensor(item.image),
            "captions": item.captions,
            "attributes": item.attributes,
            "index": index,
        }

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
            f"seed={self.seed}, captions_per_image={self.captions_per_image})"
        )
