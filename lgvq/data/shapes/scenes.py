"""Scenes of captioned shapes: the attributes of one image (objects in grid cells, their
spatial relations, the background) and how they are drawn from a random generator."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lgvq.data.shapes.vocabulary import (
    COLOUR_NAMES,
    GRID_SIDE,
    MAX_OBJECTS,
    REGION_NAMES_BY_CELL,
    SHAPE_NAMES,
    SIZE_NAMES,
)

# Object geometry, as fractions of the image side. A cell is 1/3 wide (half-width 0.1667);
# radius + largest jitter + margin stays inside the cell, so objects never touch.
_LARGE_RADIUS = 0.13
_SMALL_RADIUS = 0.075
_CELL_MARGIN = 0.01
DEFAULT_RADII = (_LARGE_RADIUS, _SMALL_RADIUS)  # (large, small), fractions of the image side


def check_radii(radii) -> tuple[float, float]:
    """``(large, small)`` object radii: 0 < small < large and the large one fits in its cell."""
    limit = 0.5 / GRID_SIDE - _CELL_MARGIN
    try:
        large, small = (float(r) for r in radii)
    except (TypeError, ValueError):
        raise ValueError(f"radii must be two numbers (large, small), got {radii!r}") from None
    if not 0 < small < large <= limit:
        raise ValueError(f"radii must satisfy 0 < small < large <= {limit:.4f} (an object stays "
                         f"in its grid cell), got large={large}, small={small}")
    return large, small


def check_object_range(min_objects: int, max_objects: int) -> None:
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
            f"got min_objects={min_objects}, max_objects={max_objects}"
        )


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
    generator: np.random.Generator, min_objects: int = 1, max_objects: int = MAX_OBJECTS,
    radii: tuple[float, float] = DEFAULT_RADII,
) -> SceneAttributes:
    """Draw a scene: object count, distinct cells, (colour, shape) pairs unique in the scene;
    a "large" object has circumradius ``radii[0]``, a "small" one ``radii[1]``.

    Consumes one ``generator.random`` call; the choices are made in Python from those numbers
    (numpy calls cost ~5 us each and would dominate generation time).
    """
    check_object_range(min_objects, max_objects)
    large_radius, small_radius = check_radii(radii)
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
        radius = large_radius if size == "large" else small_radius
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
