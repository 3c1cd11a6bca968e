"""The words of captioned shapes: shape, colour, size, region, relation and count names with
their synonyms and phrases, the template words, and the attribute words recall tests mask."""

from __future__ import annotations

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
TEMPLATE_WORDS: tuple[str, ...] = (
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
