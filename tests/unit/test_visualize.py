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
    out = visualize.draw_detections(gray, np.zeros((0, 4)), [], [], np.zeros((0, 50, 60), bool), NAMES,
                                    min_short_side=0)
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


def test_inverted_boxes_are_drawn_like_their_normalised_box():
    image, boxes, masks = _scene(120, 160)
    x1, y1, x2, y2 = boxes[0]
    expected = visualize.draw_detections(image, boxes, [1], [0.8], masks, NAMES)
    for inverted in ([x2, y1, x1, y2], [x1, y2, x2, y1], [x2, y2, x1, y1]):
        out = visualize.draw_detections(image, np.array([inverted]), [1], [0.8], masks, NAMES)
        np.testing.assert_array_equal(out, expected)


def test_non_finite_boxes_and_scores_do_not_raise():
    image, boxes, masks = _scene(100, 100)
    plain = visualize.draw_detections(image, np.zeros((0, 4)), [], [], None, NAMES)
    # A NaN box with a mask is drawn at the mask's extent; one without mask pixels is skipped.
    from_mask = visualize.draw_detections(image, [[np.nan, 0, 50, 50]], [1], [0.9], masks, NAMES)
    extent = visualize.draw_detections(image, [[30, 40, 70, 80]], [1], [0.9], masks, NAMES)
    np.testing.assert_array_equal(from_mask, extent)
    empty = np.zeros_like(masks)
    for bad in ([np.nan] * 4, [0, 0, np.inf, 10], [-np.inf, 5, 5, np.nan]):
        out = visualize.draw_detections(image, [bad], [1], [0.9], empty, NAMES)
        np.testing.assert_array_equal(out, plain)
        out = visualize.draw_detections(image, [bad], [1], [0.9], None, NAMES)
        np.testing.assert_array_equal(out, plain)
    # NaN score: printed as such, the other detection still drawn.
    out = visualize.draw_detections(image, np.concatenate([boxes, boxes + 5]), [1, 2], [np.nan, 0.7], None, NAMES)
    assert out.shape == plain.shape and not np.array_equal(out, plain)


def test_boxes_outside_the_image_are_clipped_or_skipped():
    image = np.full((100, 200, 3), 128, np.uint8)
    plain = visualize.draw_detections(image, np.zeros((0, 4)), [], [], None, NAMES, min_short_side=0)
    for outside in ([250, 10, 300, 50], [-80, -40, -5, -1], [10, 120, 50, 1e30]):
        out = visualize.draw_detections(image, [outside], [1], [0.9], None, NAMES, min_short_side=0)
        np.testing.assert_array_equal(out, plain)
    # Partly outside: the outline runs along the image border, the label stays inside the image.
    out = visualize.draw_detections(image, [[-50, 20, 80, 1e9]], [1], [0.9], None, NAMES, min_short_side=0)
    colour = visualize.PALETTE[0].astype(np.uint8)
    assert np.all(out[40:90, 0] == colour) and np.all(out[-1, 5:75] == colour)
    boxes, drawable = visualize.sanitize_boxes(np.array([[-50, 20, 80, 1e9], [300, 0, 250, 10]]), None, 100, 200)
    np.testing.assert_array_equal(boxes[0], [0, 20, 80, 100])
    assert drawable.tolist() == [True, False]


def test_labels_do_not_cover_each_other():
    placed = []
    for _ in range(6):  # six detections of one object: each label gets its own row
        rect = visualize._place_label((40.0, 60.0, 140.0, 160.0), (70.0, 18.0), placed, 400, 300)
        assert 0 <= rect[0] and rect[2] <= 400 and 0 <= rect[1] and rect[3] <= 300
        assert not any(visualize._overlaps(rect, p) for p in placed)
        placed.append(rect)
    assert placed[0] == (40.0, 42.0, 110.0, 60.0)  # the first one above its box
    # A box at the top edge: the label goes just inside it.
    assert visualize._place_label((10.0, 0.0, 90.0, 50.0), (50.0, 18.0), [], 400, 300) == (10.0, 0.0, 60.0, 18.0)


def test_label_ink_contrasts_with_its_strip():
    assert visualize._ink((255, 127, 14)) == (0, 0, 0)  # orange: black text
    assert visualize._ink((31, 119, 180)) == (255, 255, 255)  # blue: white text
    assert visualize._ink((60, 60, 60)) == (255, 255, 255)
    assert visualize._ink((255, 187, 0)) == (0, 0, 0)


def test_extreme_aspect_ratios_are_not_upscaled_without_bound():
    strip = np.full((4, 600, 3), 200, np.uint8)
    out = visualize.draw_detections(strip, [[10, 0, 100, 4]], [1], [0.9], np.ones((1, 4, 600), bool), NAMES)
    assert out.shape[1] == 2048 and out.shape[0] == round(4 * 2048 / 600)
    tall = visualize.draw_detections(np.zeros((3000, 2, 3), np.uint8), np.zeros((0, 4)), [], [], None, NAMES)
    assert tall.shape == (3000, 2, 3)  # already past the bound: never shrunk either


def test_mask_rim_on_the_bounding_box_equals_the_whole_image():
    """Masks are blended on their bounding box only; the result is the whole-image computation's."""
    image = np.full((90, 120, 3), 100, np.uint8)
    masks = np.zeros((2, 90, 120), bool)
    masks[0, 0:30, 0:50] = True  # touches the image border
    masks[1, 40:70, 60:118] = True
    masks[1, 50:60, 80:100] = False  # a hole: an inner rim too
    # Instance 1's box lies 2 px outside its mask (PIL draws the outline inside the box), its label above.
    boxes = [[0, 0, 50, 30], [56, 36, 120, 74]]
    out = visualize.draw_detections(image, boxes, [1, 2], [0.5, 0.6], masks, NAMES, min_short_side=0).astype(int)
    canvas = image.astype(np.float32)
    for i in (0, 1):
        canvas[masks[i]] = canvas[masks[i]] * 0.55 + visualize.PALETTE[i] * 0.45
        canvas[visualize._boundary(masks[i], 2)] = visualize.PALETTE[i] * 0.55
    expected = np.clip(np.rint(canvas), 0, 255).astype(int)
    np.testing.assert_array_equal(out[masks[1]], expected[masks[1]])
    rim = visualize._boundary(masks[1], 2)
    assert rim[40, 70] and rim[69, 70] and rim[45, 117] and rim[49, 90]  # top, bottom, right edge; around the hole
    # Instance 0 (clipped by the image border) away from its outline and label.
    np.testing.assert_array_equal(out[20:28, 20:48], expected[20:28, 20:48])


def _detections():
    """One image's detections in a 32x32 network input: a valid one (score 0.9), a valid one under the picture
    threshold (0.2) and an invalid slot."""
    from maskx_jax.types import Detections

    boxes = np.array([[[4, 4, 20, 28], [2, 2, 10, 10], [0, 0, 31, 31]]], np.float32)
    masks = np.zeros((1, 3, 28, 28), np.float32)
    masks[0, :, 7:21, 7:21] = 0.9
    return Detections(boxes=boxes, scores=np.array([[0.9, 0.2, 0.0]], np.float32),
                      labels=np.array([[1, 2, 1]], np.int32), valid=np.array([[True, True, False]]), masks=masks)


def test_draw_row_maps_boxes_and_masks_to_the_original_image(monkeypatch):
    """pictures.draw_row (training's pictures and predict): the detections over the threshold, boxes scaled from
    the network input (32x32) to the original (64x64), masks pasted there, drawn like draw_detections."""
    from maskx_jax.eval import pictures
    from maskx_jax.eval.coco_results import paste_binary_masks

    image = np.full((64, 64, 3), 128, np.uint8)
    det = _detections()
    drawn, n = pictures.draw_row(image, det, 0, (32, 32), score_thresh=0.5, class_names=NAMES, set_b_ids=(2,))
    assert n == 1
    box = np.array([[8, 8, 40, 56]], np.float32)  # x2 in both axes
    mask = np.transpose(paste_binary_masks(det.masks[0, :1], box, 64, 64), (2, 0, 1)).astype(bool)
    assert mask.any()
    expected = visualize.draw_detections(image, box, [1], [0.9], mask, NAMES, set_b_ids=(2,))
    np.testing.assert_array_equal(drawn, expected)
    # a lower threshold draws the second detection too; boxes only without masks
    assert pictures.draw_row(image, det, 0, (32, 32), score_thresh=0.1, class_names=NAMES)[1] == 2
    boxes_only, _ = pictures.draw_row(image, det, 0, (32, 32), score_thresh=0.5, class_names=NAMES, with_masks=False)
    np.testing.assert_array_equal(boxes_only, visualize.draw_detections(image, box, [1], [0.9], None, NAMES))
    # pasting in groups (large photos) gives the one-call paste
    many = np.repeat(det.masks[0, :1], 40, axis=0)
    boxes = np.repeat(box, 40, axis=0)
    whole = pictures.pasted_masks(many, boxes, 64, 64)
    monkeypatch.setattr(pictures, "PASTE_PIXELS", 64 * 64 * 16)
    np.testing.assert_array_equal(pictures.pasted_masks(many, boxes, 64, 64), whole)
