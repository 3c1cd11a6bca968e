"""Tests of the attribute judge (lgvq.evaluation.attributes) and the object masks it reads
(lgvq.data.shapes.rendering): exact masks, the judge's own accuracy on real renders, that it
fails on images that do not show the objects, that colour and shape errors are each detected,
bad input, and speed."""

import dataclasses
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lgvq.data.shapes import COLOUR_NAMES, COLOUR_RGB, SHAPE_NAMES, render_scene, sample_scene
from lgvq.data.shapes.rendering import object_coverage, object_masks
from lgvq.evaluation import AttributeFidelity, attribute_fidelity, judge_accuracy_on_real_renders
from lgvq.evaluation.attributes import _shape_templates, real_render_batch


def _as_images(renders):
    """uint8 [H, W, 3] renders -> float32 [B, 3, H, W] in [-1, 1]."""
    stacked = np.stack(renders).transpose(0, 3, 1, 2).astype(np.float32)
    return torch.from_numpy(stacked / 127.5 - 1.0)


def _rerendered(scenes, change, image_size):
    """Render every scene with ``change(object)`` applied to each object."""
    return _as_images(
        [
            render_scene(
                dataclasses.replace(scene, objects=tuple(change(o) for o in scene.objects)),
                image_size,
            )
            for scene in scenes
        ]
    )


def _gaussian_blur(images, sigma):
    radius = int(3 * sigma)
    taps = torch.exp(-((torch.arange(-radius, radius + 1) / sigma) ** 2) / 2)
    taps = taps / taps.sum()
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, taps.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(rows, taps.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


# ---- object masks --------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 48, 64])
def test_object_coverage_reproduces_the_renderer(image_size):
    generator = np.random.default_rng(3)
    for _ in range(40):
        scene = sample_scene(generator)
        background = np.asarray(scene.background_rgb, dtype=np.float64)
        model = np.broadcast_to(background, (image_size, image_size, 3)).copy()
        for item in scene.objects:
            coverage = object_coverage(item, image_size)
            assert coverage.dtype == np.float32 and coverage.shape == (image_size, image_size)
            assert set(np.unique(coverage)) <= {0.0, 0.25, 0.5, 0.75, 1.0}
            model += coverage[..., None] * (np.asarray(COLOUR_RGB[item.colour]) - background)
        # Only the renderer's rounding to uint8 separates it from background + coverage * ink.
        assert np.abs(render_scene(scene, image_size) - model).max() <= 0.5


@pytest.mark.parametrize("image_size", [32, 64])
def test_object_masks_are_the_pixels_moved_half_way(image_size):
    generator = np.random.default_rng(4)
    for _ in range(40):
        scene = sample_scene(generator)
        masks = object_masks(scene, image_size)
        assert masks.dtype == bool and masks.shape == (scene.count, image_size, image_size)
        assert masks.sum(0).max() <= 1  # disjoint
        assert (masks.sum((1, 2)) > 0).all()  # every object has pixels
        image = render_scene(scene, image_size).astype(np.float64)
        background = np.asarray(scene.background_rgb, dtype=np.float64)
        for item, mask in zip(scene.objects, masks):
            ink = np.asarray(COLOUR_RGB[item.colour]) - background
            moved = (image - background) @ ink / (ink @ ink)  # 0 = background, 1 = full colour
            cell = np.zeros_like(mask)  # the object's grid cell
            lo_row, hi_row = item.row * image_size // 3, (item.row + 1) * image_size // 3
            lo_col, hi_col = item.column * image_size // 3, (item.column + 1) * image_size // 3
            cell[lo_row:hi_row, lo_col:hi_col] = True
            assert (moved[mask] >= 0.5 - 1e-2).all()
            assert (moved[cell & ~mask] < 0.5 + 1e-2).all()


# ---- the judge on real renders ---------------------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 48, 64])
def test_judge_is_exact_on_real_renders(image_size):
    fidelity = judge_accuracy_on_real_renders(n=300, image_size=image_size, seed=0)
    print(
        f"judge on real renders at {image_size} px: colour {fidelity.colour_accuracy:.4f}, "
        f"shape {fidelity.shape_accuracy:.4f} over {fidelity.object_count} objects"
    )
    assert isinstance(fidelity, AttributeFidelity)
    assert fidelity.object_count > 300
    assert fidelity.colour_accuracy == 1.0
    assert fidelity.shape_accuracy == 1.0  # measured 1.0 on 2,000 scenes at 32, 48 and 64 px
    assert fidelity.object_accuracy == 1.0
    assert np.allclose(fidelity.contrast_ratio, 1.0, atol=0.02)


def test_judge_tolerates_noise_and_a_shifted_background():
    images, scenes = real_render_batch(200, 32, seed=1)
    noisy = images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    fidelity = attribute_fidelity(noisy, scenes)
    assert fidelity.colour_accuracy >= 0.99 and fidelity.shape_accuracy >= 0.99
    shifted = attribute_fidelity(images + 0.1, scenes)
    assert shifted.colour_accuracy == 1.0 and shifted.shape_accuracy == 1.0


def test_per_object_fields_line_up_with_the_scenes():
    images, scenes = real_render_batch(20, 32, seed=2)
    fidelity = attribute_fidelity(images.numpy(), scenes, image_size=32)  # numpy works too
    count = sum(scene.count for scene in scenes)
    assert fidelity.object_count == count
    for field in ("image_index", "object_index", "colour_correct", "shape_correct"):
        assert len(getattr(fidelity, field)) == count
    for i, o, colour, shape in zip(
        fidelity.image_index,
        fidelity.object_index,
        fidelity.predicted_colours,
        fidelity.predicted_shapes,
    ):
        assert (colour, shape) == (scenes[i].objects[o].colour, scenes[i].objects[o].shape)


# ---- the judge can fail ----------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [32, 64])
def test_images_without_the_objects_score_zero(image_size):
    images, scenes = real_render_batch(100, image_size, seed=3)
    background_only = _as_images(
        [render_scene(dataclasses.replace(scene, objects=()), image_size) for scene in scenes]
    )
    for blank in (background_only, torch.zeros_like(images)):  # plain background, mid grey
        fidelity = attribute_fidelity(blank, scenes)
        assert fidelity.colour_accuracy == 0.0 and fidelity.shape_accuracy == 0.0
        assert set(fidelity.predicted_colours) == {None}
        assert set(fidelity.predicted_shapes) == {None}


def test_blur_lowers_both_scores():
    images, scenes = real_render_batch(200, 32, seed=4)
    mild = attribute_fidelity(_gaussian_blur(images, 1.0), scenes)
    strong = attribute_fidelity(_gaussian_blur(images, 3.0), scenes)
    # Measured (500 scenes): sigma 1 px -> colour 0.88, shape 0.81; sigma 3 px -> 0.00, 0.00.
    assert 0.5 < mild.shape_accuracy < 0.95 and 0.5 < mild.colour_accuracy < 0.99
    assert strong.shape_accuracy < 0.1 and strong.colour_accuracy < 0.1


@pytest.mark.parametrize("image_size", [32, 64])
def test_wrong_colours_are_detected_and_leave_shape_alone(image_size):
    _, scenes = real_render_batch(100, image_size, seed=5)

    def next_colour(item):
        return dataclasses.replace(
            item, colour=COLOUR_NAMES[(COLOUR_NAMES.index(item.colour) + 1) % len(COLOUR_NAMES)]
        )

    fidelity = attribute_fidelity(_rerendered(scenes, next_colour, image_size), scenes)
    assert fidelity.colour_accuracy == 0.0 and fidelity.shape_accuracy == 1.0
    judged = zip(fidelity.image_index, fidelity.object_index, fidelity.predicted_colours)
    for i, o, colour in judged:
        assert colour == next_colour(scenes[i].objects[o]).colour


def test_colours_swapped_between_objects_are_detected():
    _, scenes = real_render_batch(200, 48, seed=6)
    swapped_scenes, expected = [], []
    for scene in scenes:
        colours = [item.colour for item in scene.objects]
        rolled = colours[1:] + colours[:1]  # each object takes the next object's colour
        swapped_scenes.append(
            dataclasses.replace(
                scene,
                objects=tuple(
                    dataclasses.replace(item, colour=colour)
                    for item, colour in zip(scene.objects, rolled)
                ),
            )
        )
        expected.extend(a == b for a, b in zip(colours, rolled))
    images = _as_images([render_scene(scene, 48) for scene in swapped_scenes])
    fidelity = attribute_fidelity(images, scenes)
    assert fidelity.colour_correct.tolist() == expected
    assert fidelity.colour_accuracy < 0.7 and fidelity.shape_accuracy == 1.0


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_wrong_shapes_are_detected_and_leave_colour_alone(image_size, step):
    _, scenes = real_render_batch(60, image_size, seed=7)

    def other_shape(item):
        index = (SHAPE_NAMES.index(item.shape) + step) % len(SHAPE_NAMES)
        return dataclasses.replace(item, shape=SHAPE_NAMES[index])

    fidelity = attribute_fidelity(_rerendered(scenes, other_shape, image_size), scenes)
    assert fidelity.shape_accuracy == 0.0 and fidelity.colour_accuracy == 1.0
    for i, o, shape in zip(fidelity.image_index, fidelity.object_index, fidelity.predicted_shapes):
        assert shape == other_shape(scenes[i].objects[o]).shape


# ---- input checks, empty input, speed ------------------------------------------------------


def test_bad_input_raises_value_error_naming_the_argument():
    images, scenes = real_render_batch(4, 32, seed=8)
    with pytest.raises(ValueError, match="images"):
        attribute_fidelity(images[0], scenes)  # [3, H, W]
    with pytest.raises(ValueError, match="images"):
        attribute_fidelity(images[:, :1], scenes)  # one channel
    with pytest.raises(ValueError, match="images"):
        attribute_fidelity(images[:, :, :, :31], scenes)  # not square
    with pytest.raises(ValueError, match="images"):
        attribute_fidelity((images * 127).to(torch.int64), scenes)  # not floating point
    with pytest.raises(ValueError, match="scenes"):
        attribute_fidelity(images, scenes[:3])
    with pytest.raises(ValueError, match="scenes"):
        attribute_fidelity(images, scenes[:3] + ["a red circle"])
    with pytest.raises(ValueError, match="image_size"):
        attribute_fidelity(images, scenes, image_size=64)
    with pytest.raises(ValueError, match="n"):
        judge_accuracy_on_real_renders(n=0, image_size=32)


def test_no_objects_gives_nan_accuracies():
    fidelity = attribute_fidelity(torch.zeros(0, 3, 32, 32), [])
    assert fidelity.object_count == 0 and np.isnan(fidelity.colour_accuracy)
    images, scenes = real_render_batch(2, 32, seed=9)
    empty_scenes = [dataclasses.replace(scene, objects=()) for scene in scenes]
    assert attribute_fidelity(images, empty_scenes).object_count == 0


def test_scoring_256_images_is_fast():
    images, scenes = real_render_batch(256, 64, seed=10)
    _shape_templates.cache_clear()
    start = time.process_time()
    attribute_fidelity(images, scenes)
    first = time.process_time() - start
    start = time.process_time()
    attribute_fidelity(images, scenes)
    cached = time.process_time() - start
    print(f"256 images of 64 px: {first:.3f} s CPU first time, {cached:.3f} s with cached windows")
    assert first < 2.0 and cached < 0.5  # measured ~0.41 s and ~0.08 s on one core
