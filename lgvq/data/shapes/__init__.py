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

The package follows those seams: ``vocabulary`` (the words), ``scenes`` (attributes and their
draw), ``rendering`` (pixels), ``captions`` (templates and word tools) and ``dataset`` (items
keyed by seed, split and index).
"""

from lgvq.data.shapes.captions import (
    CAPTION_TEMPLATE_COUNT,
    caption_for,
    caption_vocabulary,
    caption_words,
    find_attribute_words,
    sample_captions,
)
from lgvq.data.shapes.dataset import (
    DEFAULT_SPLIT_SIZES,
    SPLIT_STREAMS,
    CaptionedScene,
    ShapesDataset,
    generate_captioned_scene,
    item_generator,
)
from lgvq.data.shapes.rendering import render_scene
from lgvq.data.shapes.scenes import (
    SceneAttributes,
    ShapeObject,
    SpatialRelation,
    sample_scene,
    spatial_relations,
)
from lgvq.data.shapes.vocabulary import (
    ALL_ATTRIBUTE_WORDS,
    ATTRIBUTE_WORDS,
    COLOUR_NAMES,
    COLOUR_RGB,
    COUNT_WORDS,
    GRID_SIDE,
    MAX_CAPTION_WORDS,
    MAX_OBJECTS,
    REGION_NAMES,
    REGION_NAMES_BY_CELL,
    REGION_PHRASES,
    RELATION_NAMES,
    RELATION_PHRASES,
    RELATION_PRONOUN_PHRASES,
    SHAPE_NAMES,
    SIZE_NAMES,
    SIZE_SYNONYMS,
    TEMPLATE_WORDS,
)

__all__ = [
    "ALL_ATTRIBUTE_WORDS",
    "ATTRIBUTE_WORDS",
    "CAPTION_TEMPLATE_COUNT",
    "COLOUR_NAMES",
    "COLOUR_RGB",
    "COUNT_WORDS",
    "DEFAULT_SPLIT_SIZES",
    "GRID_SIDE",
    "MAX_CAPTION_WORDS",
    "MAX_OBJECTS",
    "REGION_NAMES",
    "REGION_NAMES_BY_CELL",
    "REGION_PHRASES",
    "RELATION_NAMES",
    "RELATION_PHRASES",
    "RELATION_PRONOUN_PHRASES",
    "SHAPE_NAMES",
    "SIZE_NAMES",
    "SIZE_SYNONYMS",
    "SPLIT_STREAMS",
    "TEMPLATE_WORDS",
    "CaptionedScene",
    "SceneAttributes",
    "ShapeObject",
    "ShapesDataset",
    "SpatialRelation",
    "caption_for",
    "caption_vocabulary",
    "caption_words",
    "find_attribute_words",
    "generate_captioned_scene",
    "item_generator",
    "render_scene",
    "sample_captions",
    "sample_scene",
    "spatial_relations",
]
