"""Drawing a scene of captioned shapes: PIL at 2x, then box-downsampled (anti-aliased edges).
Rendering has no randomness."""

from __future__ import annotations

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
