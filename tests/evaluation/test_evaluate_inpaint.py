"""The inpainting check's pieces: the box around a subject on a plain backdrop, and the inside / outside
measures (``sdtune.evaluate_inpaint``)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sdtune.data.sample import ORANGE, TEAL
from sdtune.evaluate_inpaint import InpaintProbe, inside_distance, outside_difference, subject_box


def _scene(backdrop=(128, 128, 128), box=(8, 10, 20, 26)) -> Image.Image:
    image = Image.new("RGB", (32, 32), backdrop)
    draw = ImageDraw.Draw(image)
    draw.rectangle(box, fill=ORANGE)
    draw.rectangle((box[0] + 2, box[1], box[2] - 2, box[1] + 4), fill=TEAL)
    return image


def test_subject_box_covers_what_differs_from_the_backdrop():
    for backdrop in ((235, 235, 235), (128, 128, 128), (25, 25, 25)):
        mask = np.asarray(subject_box(_scene(backdrop), margin=1)) > 0
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (7, 9, 21, 27)
        assert mask[9:28, 7:22].all()  # a rectangle, not the shape
    assert not np.asarray(subject_box(Image.new("RGB", (32, 32), (128, 128, 128)))).any()


def test_outside_difference_ignores_the_masked_region():
    scene, mask = _scene(), subject_box(_scene())
    painted = scene.copy()
    painted.paste((0, 255, 0), (8, 10, 21, 27))  # only inside the box
    assert outside_difference([painted], [scene], [mask]) == 0.0
    shifted = Image.fromarray((np.asarray(scene).astype(int) + 10).clip(0, 255).astype(np.uint8))
    assert abs(outside_difference([shifted], [scene], [mask]) - 10.0) < 1e-9


def test_inside_distance_compares_the_painted_colours_with_the_subject():
    scene, mask = _scene(), subject_box(_scene(), margin=0)
    assert inside_distance([scene], [scene], [mask]) < 1e-9
    red_outside = _scene(backdrop=(200, 60, 60))  # a red backdrop outside the mask does not vote
    assert inside_distance([red_outside], [scene], [mask]) < 1e-9
    other = scene.copy()
    other.paste((106, 63, 181), (8, 10, 21, 27))  # purple where the subject is orange and teal
    assert inside_distance([other], [scene], [mask]) > 0.9


def test_the_grid_input_shows_the_mask_on_the_view():
    scene = _scene()
    shown = np.asarray(InpaintProbe.of([scene], 1).shown_input()).astype(int)
    view, inside = np.asarray(scene).astype(int), np.asarray(subject_box(scene)) > 0
    assert (shown[~inside] == view[~inside]).all()
    redder = (shown[..., 0] - shown[..., 1:].mean(-1)) - (view[..., 0] - view[..., 1:].mean(-1))
    assert (redder[inside] > 20).all()
