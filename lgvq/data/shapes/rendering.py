"""Drawing a scene of captioned shapes: PIL at 2x, then box-downsampled (anti-aliased edges).
Rendering has no randomness."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

from lgvq.data.shapes.scenes import SceneAttributes, ShapeObject
from lgvq.data.shapes.vocabulary import COLOUR_RGB, SHAPE_NAMES

_SUPERSAMPLING = 2  # render at 2x, then box-downsample: anti-aliased edges


def check_image_size(image_size: int) -> None:
    is_int = isinstance(image_size, int) and not isinstance(image_size, bool)
    if not is_int or not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int in [8, 1024], got {image_size!r}")


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
    check_image_size(image_size)
    canvas_side = image_size * _SUPERSAMPLING
    canvas = Image.new("RGB", (canvas_side, canvas_side), scene.background_rgb)
    draw = ImageDraw.Draw(canvas)
    for item in scene.objects:
        _draw_object(draw, item, canvas_side)
    return np.array(canvas.reduce(_SUPERSAMPLING))


def object_coverage(item: ShapeObject, image_size: int = 64) -> np.ndarray:
    """The fraction of each pixel that ``item`` covers, exactly as ``render_scene`` draws it.

    Returns float32 [image_size, image_size] with values in {0, 1/4, 1/2, 3/4, 1}: the object
    is drawn with the renderer's own code at 2x (whole sub-pixels, no anti-aliasing) and
    box-downsampled, so a pixel of ``render_scene`` is ``round(background + coverage *
    (colour - background))`` wherever this object is the only one nearby (objects never share
    a pixel: each sits in its own grid cell).
    """
    check_image_size(image_size)
    canvas_side = image_size * _SUPERSAMPLING
    # Black on white: each downsampled pixel is 255 - 230 * (covered sub-pixels / 4).
    canvas = Image.new("RGB", (canvas_side, canvas_side), (255, 255, 255))
    _draw_object(ImageDraw.Draw(canvas), dataclasses.replace(item, colour="black"), canvas_side)
    red = np.asarray(canvas.reduce(_SUPERSAMPLING))[:, :, 0].astype(np.float32)
    sub_pixels = _SUPERSAMPLING * _SUPERSAMPLING
    ink = 255.0 - COLOUR_RGB["black"][0]
    covered = np.rint((255.0 - red) * (sub_pixels / ink))  # whole sub-pixels: undoes rounding
    return (covered / sub_pixels).astype(np.float32)


def object_masks(scene: SceneAttributes, image_size: int = 64) -> np.ndarray:
    """The pixels of each object of ``scene``: bool [n_objects, image_size, image_size].

    A pixel belongs to an object when the object covers at least half of it
    (``object_coverage >= 0.5``), i.e. when ``render_scene`` moved its colour at least half-way
    from the background to the object's colour. Objects never overlap (distinct grid cells), so
    the masks are disjoint; every object's mask is non-empty at the sizes the data uses (>= 32).
    """
    check_image_size(image_size)
    masks = np.zeros((len(scene.objects), image_size, image_size), dtype=bool)
    for index, item in enumerate(scene.objects):
        masks[index] = object_coverage(item, image_size) >= 0.5
    return masks
