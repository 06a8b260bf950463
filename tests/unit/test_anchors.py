"""maskx_jax.anchors against torchvision's AnchorGenerator (bit-exact)."""
import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList

from maskx_jax.anchors import DEFAULT_ASPECT_RATIOS, DEFAULT_SIZES, anchor_grid, cell_anchors


def torch_anchors(image_hw, feature_hw, sizes, aspect_ratios):
    gen = AnchorGenerator(sizes, aspect_ratios)
    images = ImageList(torch.zeros(2, 3, *image_hw), [tuple(image_hw), (image_hw[0] - 30, image_hw[1] - 17)])
    feats = [torch.zeros(2, 8, h, w) for h, w in feature_hw]
    out = gen(images, feats)
    assert len(out) == 2 and torch.equal(out[0], out[1])  # the same anchors for every image
    counts = [h * w * len(s) * len(a) for (h, w), s, a in zip(feature_hw, sizes, aspect_ratios)]
    return out[0].numpy(), counts


@pytest.mark.parametrize(
    "image_hw, feature_hw",
    [
        ((256, 320), [(64, 80), (32, 40), (16, 20), (8, 10), (4, 5)]),  # strides 4..64
        # Ceil-mode pooled last level and sizes that do not divide evenly (stride = H // h).
        ((800, 1216), [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]),
    ],
)
def test_anchor_grid_matches_torchvision(image_hw, feature_hw):
    ref, ref_counts = torch_anchors(image_hw, feature_hw, DEFAULT_SIZES, DEFAULT_ASPECT_RATIOS)
    got, counts = anchor_grid(image_hw, feature_hw)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert counts == ref_counts and sum(counts) == got.shape[0]
    np.testing.assert_array_equal(got, ref)


def test_anchor_grid_multi_size_levels_and_cache():
    sizes = ((16, 24), (48, 96))
    ratios = ((0.5, 1.0, 2.0, 1.5), (0.25, 1.0))
    image_hw, feature_hw = (96, 128), [(24, 32), (12, 16)]
    ref, ref_counts = torch_anchors(image_hw, feature_hw, sizes, ratios)
    got, counts = anchor_grid(image_hw, feature_hw, sizes, ratios)
    np.testing.assert_array_equal(got, ref)
    assert counts == ref_counts
    again, _ = anchor_grid(list(image_hw), [list(f) for f in feature_hw], sizes, ratios)
    assert again is got  # cached on the static arguments
    assert not got.flags.writeable


def test_cell_anchors_match_generate_anchors():
    gen = AnchorGenerator()
    for sizes, ratios in [((32,), (0.5, 1.0, 2.0)), ((128, 256, 512), (0.5, 1.0, 2.0)), ((45,), (0.3, 3.0))]:
        ref = gen.generate_anchors(list(sizes), list(ratios)).numpy()
        got = cell_anchors(sizes, ratios)
        assert got.shape == (len(sizes) * len(ratios), 4)
        np.testing.assert_array_equal(got, ref)
