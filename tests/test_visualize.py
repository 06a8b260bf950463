"""maskx_jax.visualize: shapes, upscaling, mask colouring and the set-B marking."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from maskx_jax import visualize

NAMES = ["__background__", "person", "car"]


def _scene(height, width):
    """A grey image with one box and a filled rectangular mask well inside it."""
    image = np.full((height, width, 3), 128, np.uint8)
    box = np.array([[0.2 * width, 0.3 * height, 0.8 * width, 0.9 * height]], np.float32)
    masks = np.zeros((1, height, width), bool)
    masks[0, int(0.4 * height) : int(0.8 * height), int(0.3 * width) : int(0.7 * width)] = True
    return image, box, masks


@pytest.mark.parametrize(
    "hw,expected",
    [((64, 96), (384, 576)), ((128, 128), (384, 384)), ((500, 700), (500, 700))],
)
def test_shapes_and_upscaling(hw, expected):
    image, boxes, masks = _scene(*hw)
    out = visualize.draw_detections(image, boxes, [1], [0.87], masks, NAMES)
    assert out.shape == expected + (3,) and out.dtype == np.uint8
    assert not np.array_equal(out, np.asarray(Image.fromarray(image).resize(expected[::-1])))


def test_no_upscale_and_grayscale_and_empty():
    gray = np.full((50, 60), 90, np.uint8)
    out = visualize.draw_detections(gray, np.zeros((0, 4)), [], [], np.zeros((0, 50, 60), bool), NAMES, min_short_side=0)
    assert out.shape == (50, 60, 3)
    np.testing.assert_array_equal(out, 90)


def test_masks_colour_their_pixels():
    image, boxes, masks = _scene(400, 400)
    with_mask = visualize.draw_detections(image, boxes, [1], [0.9], masks, NAMES).astype(int)
    without = visualize.draw_detections(image, boxes, [1], [0.9], None, NAMES).astype(int)
    inside = masks[0].copy()
    inside[:170] = inside[310:] = False  # the mask interior, away from its rim
    inside[:, :130] = inside[:, 270:] = False
    outside = ~masks[0]
    outside[100:380, 60:340] = False  # and away from the box and its label
    np.testing.assert_array_equal(without[inside], 128)
    tint = with_mask[inside]
    colour = visualize.PALETTE[0]
    # Moved from grey toward the instance colour, by the same amount everywhere.
    assert np.all(np.sign(tint - 128) == np.sign(colour - 128))
    assert len(np.unique(tint, axis=0)) == 1
    np.testing.assert_array_equal(with_mask[outside], without[outside])
    # The rim is darker than the fill.
    rim = visualize._boundary(masks[0], 2)
    assert with_mask[rim].sum(axis=1).mean() < tint.sum(axis=1).mean()


def test_set_b_marking():
    image, boxes, _ = _scene(400, 400)
    plain = visualize.draw_detections(image, boxes, [2], [0.9], None, NAMES)
    marked = visualize.draw_detections(image, boxes, [2], [0.9], None, NAMES, set_b_ids=[2])
    x1, _, x2, y2 = boxes[0].astype(int)
    bottom_plain = plain[y2, x1 + 4 : x2 - 4]
    bottom_marked = marked[y2, x1 + 4 : x2 - 4]
    colour = visualize.PALETTE[0].astype(np.uint8)
    assert np.all(bottom_plain == colour)  # solid edge
    on = np.all(bottom_marked == colour, axis=1)
    assert 0.3 < on.mean() < 0.7  # dashed edge: about half drawn
    # The legend strip (black) sits at the bottom left only when set B is present.
    assert np.all(marked[-3, :20] == 0) and np.all(plain[-3, :20] == 128)
    # Same picture when set B is about another class.
    other = visualize.draw_detections(image, boxes, [2], [0.9], None, NAMES, set_b_ids=[1])
    np.testing.assert_array_equal(other, plain)


def test_many_instances_and_missing_names(tmp_path):
    rng = np.random.default_rng(0)
    h, w = 300, 450
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    n = 30
    xy = rng.random((n, 2)) * [w, h]
    boxes = np.concatenate([xy - 40, xy + 40], axis=1)  # some cross the border
    masks = rng.random((n, h, w)) > 0.97
    out = visualize.draw_detections(image, boxes, rng.integers(1, 9, n), rng.random(n), masks, NAMES, set_b_ids=[2, 5])
    assert out.shape == (384, 576, 3)
    path = tmp_path / "sub" / "vis.png"
    visualize.save_png(path, out)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), out)


def test_mask_shape_mismatch_raises():
    image, boxes, masks = _scene(40, 40)
    with pytest.raises(ValueError, match="do not match"):
        visualize.draw_detections(image, boxes, [1], [0.5], masks[:, :20], NAMES)
