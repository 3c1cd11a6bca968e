"""Captioned shapes: a generated image-caption data set whose attributes are known exactly.

Each image shows one to three coloured shapes on a light, plainly tinted background. The
canvas is a 3 x 3 grid of cells and every object sits in its own cell (jittered inside it), so
objects never overlap, every object has an exact region name ("top left", "centre", ...) and
every pair of objects has exact spatial relations ("left of", "right of", "above", "below").
No two objects in one image share both colour and shape, so "the blue square" always names
one object.

Everything about item ``index`` of split ``split`` comes from one numpy Generator seeded with
``(seed, split, index)``: the same triple always gives the same attributes, image and captions,
whatever the image size, the process or the order of access. Train, val and test draw from
different seed streams. Rendering uses PIL with 2x supersampling (anti-aliased edges). One item
(64x64 image, attributes, 5 captions) costs about 0.26 ms of one CPU core, ~3,800 items/s
(``tests/data/test_shapes.py::test_generation_speed_is_reported`` measures it).

Captions are lowercase, at most 25 words, and are built from ``CAPTION_TEMPLATE_COUNT``
templates with synonyms (sizes, positions, relations, framing words). Every caption names every
object by its colour word followed directly by its shape word; colour and shape words have no
synonyms, so captions can be parsed back and attribute words masked for recall tests
(``ATTRIBUTE_WORDS``, ``find_attribute_words``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

# Well separated hues plus black; all contrast with the light background.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (235, 200, 20),
    "green": (40, 160, 60),
    "cyan": (30, 185, 200),
    "blue": (40, 70, 215),
    "purple": (135, 55, 175),
    "black": (25, 25, 25),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOUR_RGB)

SIZE_NAMES: tuple[str, ...] = ("small", "large")
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}

GRID_SIDE = 3  # the canvas is a GRID_SIDE x GRID_SIDE grid of cells, one object per cell
REGION_NAMES_BY_CELL: tuple[tuple[str, ...], ...] = (  # [row][column], row 0 at the top
    ("top left", "top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "bottom", "bottom right"),
)
REGION_NAMES: tuple[str, ...] = tuple(name for row in REGION_NAMES_BY_CELL for name in row)
REGION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "at the top left"),
    "top": ("at the top", "near the top"),
    "top right": ("in the top right", "at the top right"),
    "left": ("on the left", "at the left"),
    "centre": ("in the centre", "in the middle"),
    "right": ("on the right", "at the right"),
    "bottom left": ("in the bottom left", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right", "at the bottom right"),
}

RELATION_NAMES: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_PHRASES: dict[str, tuple[str, ...]] = {  # "<subject> <phrase> <reference>"
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
RELATION_PRONOUN_PHRASES: dict[str, tuple[str, ...]] = {  # "<reference> with <subject> <phrase>"
    "left of": ("to its left",),
    "right of": ("to its right",),
    "above": ("above it",),
    "below": ("below it", "under it"),
}

COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")
MAX_OBJECTS = len(COUNT_WORDS)
MAX_CAPTION_WORDS = 25

# Words of the templates that carry no attribute.
_TEMPLATE_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "there", "is", "are", "shapes", "objects", "single", "picture",
    "image", "drawing", "of", "with", "nothing", "else",
)

ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {
    "colour": COLOUR_NAMES,
    "shape": SHAPE_NAMES,
    "size": tuple(word for words in SIZE_SYNONYMS.values() for word in words),
    "count": COUNT_WORDS + ("single",),
    "position": ("top", "bottom", "left", "right", "centre", "middle"),
    "relation": ("left", "right", "above", "over", "below", "under", "beneath"),
}
"""Words that carry an attribute, by category. "left" and "right" are both position and
relation words. Masked-word recall masks words from this table."""

ALL_ATTRIBUTE_WORDS: frozenset[str] = frozenset(
    word for words in ATTRIBUTE_WORDS.values() for word in words
)

SPLIT_STREAMS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 50_000, "val": 2_000, "test": 2_000}
_SEED_DOMAIN_TAG = 0x5A4E5  # keeps these streams apart from other uses of (seed, ...) seeding

# Object geometry, as fractions of the image side. A cell is 1/3 wide (half-width 0.1667);
# radius + largest jitter + margin stays inside the cell, so objects never touch.
_LARGE_RADIUS = 0.13
_SMALL_RADIUS = 0.075
_CELL_MARGIN = 0.01
_SUPERSAMPLING = 2  # render at 2x, then box-downsample: anti-aliased edges


# --------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. Positions and radius are fractions of the image side."""

    shape: str  # one of SHAPE_NAMES
    colour: str  # one of COLOUR_NAMES
    size: str  # "small" or "large"
    region: str  # one of REGION_NAMES, the name of the grid cell
    row: int  # grid row, 0 (top) .. GRID_SIDE - 1 (bottom)
    column: int  # grid column, 0 (left) .. GRID_SIDE - 1 (right)
    centre_x: float  # 0 = left edge, 1 = right edge
    centre_y: float  # 0 = top edge, 1 = bottom edge
    radius: float  # circumradius of the shape


@dataclasses.dataclass(frozen=True)
class SpatialRelation:
    """``objects[subject]`` is ``relation`` ``objects[reference]`` (e.g. 0 "left of" 1)."""

    subject: int
    relation: str  # one of RELATION_NAMES
    reference: int


@dataclasses.dataclass(frozen=True)
class SceneAttributes:
    """The exact content of one image: its objects, all pairwise relations, the background.

    ``relations`` lists every relation that holds, for every ordered pair of objects (objects in
    different columns are left/right of each other, in different rows above/below).
    """

    objects: tuple[ShapeObject, ...]
    relations: tuple[SpatialRelation, ...]
    background_rgb: tuple[int, int, int]

    @property
    def count(self) -> int:
        return len(self.objects)

    def relations_between(self, subject: int, reference: int) -> tuple[str, ...]:
        """Names of the relations that hold: ``objects[subject]`` <name> ``objects[reference]``."""
        return tuple(
            relation.relation
            for relation in self.relations
            if relation.subject == subject and relation.reference == reference
        )


def spatial_relations(objects: Sequence[ShapeObject]) -> tuple[SpatialRelation, ...]:
    """All relations that hold between the objects, from their grid cells."""
    relations = []
    for subject, first in enumerate(objects):
        for reference, second in enumerate(objects):
            if subject == reference:
                continue
            if first.column < second.column:
                relations.append(SpatialRelation(subject, "left of", reference))
            elif first.column > second.column:
                relations.append(SpatialRelation(subject, "right of", reference))
            if first.row < second.row:
                relations.append(SpatialRelation(subject, "above", reference))
            elif first.row > second.row:
                relations.append(SpatialRelation(subject, "below", reference))
    return tuple(relations)


_PAIRS = tuple((colour, shape) for colour in COLOUR_NAMES for shape in SHAPE_NAMES)
# Uniforms one scene consumes: count, cell shuffle, 4 per object, background (the last 4).
_SCENE_UNIFORMS = 1 + (GRID_SIDE * GRID_SIDE - 1) + 4 * MAX_OBJECTS + 4


def sample_scene(
    generator: np.random.Generator, min_objects: int = 1, max_objects: int = MAX_OBJECTS
) -> SceneAttributes:
    """Draw a scene: object count, distinct cells, (colour, shape) pairs unique in the scene.

    Consumes one ``generator.random`` call; the choices are made in Python from those numbers
    (numpy calls cost ~5 us each and would dominate generation time).
    """
    _check_object_range(min_objects, max_objects)
    uniforms = iter(generator.random(_SCENE_UNIFORMS).tolist())
    count = min_objects + int(next(uniforms) * (max_objects - min_objects + 1))
    cells = list(range(GRID_SIDE * GRID_SIDE))
    for position in range(len(cells) - 1):  # Fisher-Yates; the first `count` cells are used
        swap = position + int(next(uniforms) * (len(cells) - position))
        cells[position], cells[swap] = cells[swap], cells[position]
    used_pairs: set[tuple[str, str]] = set()
    objects = []
    half_cell = 0.5 / GRID_SIDE
    for cell in cells[:count]:
        pair_index = int(next(uniforms) * len(_PAIRS))
        while _PAIRS[pair_index] in used_pairs:  # taken: the next free pair
            pair_index = (pair_index + 1) % len(_PAIRS)
        colour, shape = _PAIRS[pair_index]
        used_pairs.add((colour, shape))
        size = SIZE_NAMES[int(next(uniforms) * len(SIZE_NAMES))]
        radius = _LARGE_RADIUS if size == "large" else _SMALL_RADIUS
        room = half_cell - radius - _CELL_MARGIN
        row, column = divmod(cell, GRID_SIDE)
        objects.append(
            ShapeObject(
                shape=shape,
                colour=colour,
                size=size,
                region=REGION_NAMES_BY_CELL[row][column],
                row=row,
                column=column,
                centre_x=(column + 0.5) / GRID_SIDE + (2.0 * next(uniforms) - 1.0) * room,
                centre_y=(row + 0.5) / GRID_SIDE + (2.0 * next(uniforms) - 1.0) * room,
                radius=radius,
            )
        )
    uniforms = list(uniforms)[-4:]  # the background always takes the last four numbers
    grey = 205 + int(uniforms[0] * 46)
    background = tuple(min(255, max(0, grey - 8 + int(u * 17))) for u in uniforms[1:])
    return SceneAttributes(tuple(objects), spatial_relations(objects), background)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _draw_object(draw: ImageDraw.ImageDraw, item: ShapeObject, canvas_side: int) -> None:
    x = item.centre_x * canvas_side
    y = item.centre_y * canvas_side
    r = item.radius * canvas_side
    fill = COLOUR_RGB[item.colour]
    if item.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif item.shape == "square":
        half = 0.8 * r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif item.shape == "triangle":
        # Equilateral, pointing up, its bounding box centred on (x, y).
        half_width = 0.95 * r
        half_height = 0.82 * r
        top, bottom = y - half_height, y + half_height
        draw.polygon(((x, top), (x + half_width, bottom), (x - half_width, bottom)), fill=fill)
    elif item.shape == "diamond":
        half_width = 0.8 * r
        draw.polygon(((x, y - r), (x + half_width, y), (x, y + r), (x - half_width, y)), fill=fill)
    elif item.shape == "cross":
        arm = 0.32 * r
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {item.shape!r}; expected one of {SHAPE_NAMES}")


def render_scene(scene: SceneAttributes, image_size: int = 64) -> np.ndarray:
    """Draw a scene. Returns uint8 [image_size, image_size, 3] RGB, values 0..255.

    Rendering has no randomness: the same attributes give the same pixels.
    """
    _check_image_size(image_size)
    canvas_side = image_size * _SUPERSAMPLING
    canvas = Image.new("RGB", (canvas_side, canvas_side), scene.background_rgb)
    draw = ImageDraw.Draw(canvas)
    for item in scene.objects:
        _draw_object(draw, item, canvas_side)
    return np.array(canvas.reduce(_SUPERSAMPLING))


def image_array_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] (0..255) -> contiguous float32 [3, H, W] in [-1, 1]."""
    # In numpy: one fused pass, ~3x faster than the same steps as torch ops at 64x64.
    channels_first = image.transpose(2, 0, 1).astype(np.float32, order="C")
    return torch.from_numpy(channels_first * np.float32(1 / 127.5) - np.float32(1))


def _check_object_range(min_objects: int, max_objects: int) -> None:
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
            f"got min_objects={min_objects}, max_objects={max_objects}"
        )


def _check_image_size(image_size: int) -> None:
    is_int = isinstance(image_size, int) and not isinstance(image_size, bool)
    if not is_int or not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int in [8, 1024], got {image_size!r}")


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _mix(variant: int, slot: int) -> int:
    """A 16-bit hash of (variant, slot): independent synonym choices per slot, cheaply.

    Multiplicative hashing; the high bits of the product depend on all bits of the input.
    """
    return ((((variant + (slot + 1) * 0x9E3779B9) & 0xFFFFFFFF) * 0x85EBCA6B) >> 16) & 0xFFFF


def _pick(options: Sequence[str], variant: int, slot: int) -> str:
    return options[_mix(variant, slot) % len(options)]


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun_phrase(
    item: ShapeObject, variant: int, slot: int, with_size: bool, definite: bool = False
) -> str:
    words = f"{item.colour} {item.shape}"
    if with_size:
        words = f"{_pick(SIZE_SYNONYMS[item.size], variant, slot)} {words}"
    return f"the {words}" if definite else _with_article(words)


def _position_phrase(item: ShapeObject, variant: int, slot: int) -> str:
    return _pick(REGION_PHRASES[item.region], variant, slot)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _object_order(scene: SceneAttributes, variant: int) -> list[int]:
    rotation = _mix(variant, 999) % scene.count
    order = list(range(scene.count))
    return order[rotation:] + order[:rotation]


def _relation(scene: SceneAttributes, subject: int, reference: int, variant: int, slot: int) -> str:
    # Objects occupy distinct cells, so at least one relation always holds.
    return _pick(scene.relations_between(subject, reference), variant, slot)


def _template_list_with_sizes(scene: SceneAttributes, variant: int) -> str:
    # "a big red circle, a small blue square and a tiny green cross"
    order = _object_order(scene, variant)
    return _join([_noun_phrase(scene.objects[i], variant, 10 * i, True) for i in order])


def _template_list_with_positions(scene: SceneAttributes, variant: int) -> str:
    # "a large red circle at the top left and a small blue square in the centre"
    order = _object_order(scene, variant)
    return _join(
        [
            f"{_noun_phrase(scene.objects[i], variant, 10 * i, True)} "
            f"{_position_phrase(scene.objects[i], variant, 10 * i + 1)}"
            for i in order
        ]
    )


def _template_count(scene: SceneAttributes, variant: int) -> str:
    # "there is one green triangle at the top" / "there are two shapes: a red circle and ..."
    order = _object_order(scene, variant)
    if scene.count == 1:
        item = scene.objects[0]
        size = _pick(SIZE_SYNONYMS[item.size], variant, 0)
        position = _position_phrase(item, variant, 1)
        return f"there is one {size} {item.colour} {item.shape} {position}"
    noun = _pick(("shapes", "objects"), variant, 2)
    listed = _join([_noun_phrase(scene.objects[i], variant, 10 * i, True) for i in order])
    return f"there are {COUNT_WORDS[scene.count - 1]} {noun}: {listed}"


def _template_relations(scene: SceneAttributes, variant: int) -> str:
    # "a big red circle to the left of a small blue square and a green cross below the blue square"
    if scene.count == 1:
        item = scene.objects[0]
        size = _pick(SIZE_SYNONYMS[item.size], variant, 0)
        return f"a single {size} {item.colour} {item.shape} {_position_phrase(item, variant, 1)}"
    order = _object_order(scene, variant)
    first, anchor = order[0], order[1]
    caption = (
        f"{_noun_phrase(scene.objects[first], variant, 10 * first, True)} "
        f"{_pick(RELATION_PHRASES[_relation(scene, first, anchor, variant, 50)], variant, 51)} "
        f"{_noun_phrase(scene.objects[anchor], variant, 10 * anchor, True)}"
    )
    if scene.count == 3:
        third = order[2]
        caption += (
            f" and {_noun_phrase(scene.objects[third], variant, 10 * third, True)} "
            f"{_pick(RELATION_PHRASES[_relation(scene, third, anchor, variant, 60)], variant, 61)} "
            f"{_noun_phrase(scene.objects[anchor], variant, 0, False, definite=True)}"
        )
    return caption


def _template_picture(scene: SceneAttributes, variant: int) -> str:
    # "a picture of a red circle at the top left and a blue square in the centre"
    order = _object_order(scene, variant)
    frame = _pick(("a picture of", "an image of", "a drawing of"), variant, 3)
    listed = _join(
        [
            f"{_noun_phrase(scene.objects[i], variant, 10 * i, False)} "
            f"{_position_phrase(scene.objects[i], variant, 10 * i + 1)}"
            for i in order
        ]
    )
    return f"{frame} {listed}"


def _template_definite(scene: SceneAttributes, variant: int) -> str:
    # "the red circle is at the top left and the blue square is in the centre"
    if scene.count == 1:
        item = scene.objects[0]
        size = _pick(SIZE_SYNONYMS[item.size], variant, 0)
        return f"the {item.colour} {item.shape} is {size} and {_position_phrase(item, variant, 1)}"
    order = _object_order(scene, variant)
    return _join(
        [
            f"the {scene.objects[i].colour} {scene.objects[i].shape} is "
            f"{_position_phrase(scene.objects[i], variant, 10 * i + 1)}"
            for i in order
        ]
    )


def _template_anchor(scene: SceneAttributes, variant: int) -> str:
    # "a small blue square with a big red circle to its left and a green cross above it"
    if scene.count == 1:
        item = scene.objects[0]
        return (
            f"{_noun_phrase(item, variant, 0, True)} {_position_phrase(item, variant, 1)} "
            "and nothing else"
        )
    order = _object_order(scene, variant)
    anchor, others = order[0], order[1:]
    parts = []
    for i in others:
        relation = _relation(scene, i, anchor, variant, 50 + i)
        parts.append(
            f"{_noun_phrase(scene.objects[i], variant, 10 * i, True)} "
            f"{_pick(RELATION_PRONOUN_PHRASES[relation], variant, 60 + i)}"
        )
    anchor_phrase = _noun_phrase(scene.objects[anchor], variant, 10 * anchor, True)
    return f"{anchor_phrase} with {' and '.join(parts)}"


_CAPTION_TEMPLATES = (
    _template_list_with_sizes,
    _template_list_with_positions,
    _template_count,
    _template_relations,
    _template_picture,
    _template_definite,
    _template_anchor,
)
CAPTION_TEMPLATE_COUNT = len(_CAPTION_TEMPLATES)


def caption_for(scene: SceneAttributes, template_id: int, variant: int = 0) -> str:
    """The caption of ``scene`` by template ``template_id`` (0 .. CAPTION_TEMPLATE_COUNT - 1).

    ``variant`` (any non-negative int) picks synonyms and the order in which objects are listed;
    the result is a pure function of (scene, template_id, variant).
    """
    if not 0 <= template_id < CAPTION_TEMPLATE_COUNT:
        raise ValueError(
            f"template_id must be in [0, {CAPTION_TEMPLATE_COUNT - 1}], got {template_id}"
        )
    return _CAPTION_TEMPLATES[template_id](scene, int(variant))


def sample_captions(
    scene: SceneAttributes, generator: np.random.Generator, count: int
) -> list[str]:
    """``count`` captions of the scene: distinct templates first, then repeats with new variants.

    Duplicate strings are avoided where the scene allows it (a one-object scene has few).
    Consumes one ``generator.random`` call.
    """
    uniforms = generator.random(CAPTION_TEMPLATE_COUNT + count).tolist()
    template_order = list(range(CAPTION_TEMPLATE_COUNT))
    for position in range(CAPTION_TEMPLATE_COUNT - 1):  # Fisher-Yates
        swap = position + int(uniforms[position] * (CAPTION_TEMPLATE_COUNT - position))
        template_order[position], template_order[swap] = (
            template_order[swap],
            template_order[position],
        )
    variants = [int(u * 2**31) for u in uniforms[CAPTION_TEMPLATE_COUNT:]]
    captions: list[str] = []
    seen: set[str] = set()
    for position in range(count):
        template_id = template_order[position % CAPTION_TEMPLATE_COUNT]
        caption = caption_for(scene, template_id, variants[position])
        retries = 0
        while caption in seen and retries < 8:  # deterministic: new variants derived from the old
            retries += 1
            caption = caption_for(scene, template_id, _mix(variants[position], 1000 + retries))
        seen.add(caption)
        captions.append(caption)
    return captions


def caption_words(caption: str) -> list[str]:
    """The caption's words, lowercase, punctuation removed ("circle," -> "circle")."""
    return re.findall(r"[a-z]+", caption.lower())


def find_attribute_words(caption: str) -> list[tuple[int, str]]:
    """(word index, word) of every attribute word, indices into ``caption_words(caption)``."""
    words = caption_words(caption)
    return [(index, word) for index, word in enumerate(words) if word in ALL_ATTRIBUTE_WORDS]


def caption_vocabulary() -> list[str]:
    """Every word that a caption can contain, sorted."""
    words = set(_TEMPLATE_WORDS) | set(ALL_ATTRIBUTE_WORDS)
    for table in (REGION_PHRASES, RELATION_PHRASES, RELATION_PRONOUN_PHRASES):
        for phrases in table.values():
            for phrase in phrases:
                words.update(phrase.split())
    return sorted(words)


# --------------------------------------------------------------------------------------------
# Items and the Dataset
# --------------------------------------------------------------------------------------------


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
) -> CaptionedScene:
    """Item ``index`` of ``split``: image uint8 [image_size, image_size, 3], attributes, captions.

    Attributes and captions do not depend on ``image_size``: the same scene renders at any size.
    """
    generator = item_generator(seed, split, index)
    scene = sample_scene(generator, min_objects, max_objects)
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
    ):
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split must be one of {tuple(SPLIT_STREAMS)}, got {split!r}")
        size = DEFAULT_SPLIT_SIZES[split] if size is None else size
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size (number of items) must be a positive int, got {size!r}")
        _check_image_size(image_size)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not isinstance(captions_per_image, int) or captions_per_image < 1:
            raise ValueError(
                f"captions_per_image must be a positive int, got {captions_per_image!r}"
            )
        _check_object_range(min_objects, max_objects)
        self.split = split
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.captions_per_image = captions_per_image
        self.min_objects = min_objects
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        item = generate_captioned_scene(
            self.seed,
            self.split,
            index,
            self.image_size,
            self.captions_per_image,
            self.min_objects,
            self.max_objects,
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
