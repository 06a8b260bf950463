"""ResNet-FPN parity with torchvision's resnet_fpn_backbone, level by level."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

from convert.mapping import torch_to_flax
from maskx_jax.backends.cpu import winograd
from maskx_jax.fpn import ResNetFPN
from maskx_jax.state_utils import assign_flat, flat_shapes
from tests.torch_utils import nchw, nhwc, randomize_batchnorm_, state_dict_numpy

# Relative tolerance from the issue: max abs error <= 1e-4 * max |reference| per level.
REL_TOL = 1e-4


# The last case is large enough that the FPN's P2/P3 output convolutions and layer2's 3x3 convolutions
# take the Winograd form on CPU (maskx_jax/backends/cpu/winograd.py); the test counts them.
@pytest.mark.parametrize("depth,shape", [(18, (2, 96, 128)), (50, (1, 128, 96)), (50, (2, 512, 512))])
def test_resnet_fpn_matches_torchvision(depth, shape, monkeypatch):
    winograd_calls = []
    direct = winograd.conv2d
    monkeypatch.setattr(winograd, "conv2d", lambda x, k, p: winograd_calls.append(x.shape) or direct(x, k, p))
    torch.manual_seed(depth)
    ref = resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=FrozenBatchNorm2d,
                              trainable_layers=3).eval()
    randomize_batchnorm_(ref, seed=depth)
    ours = ResNetFPN(depth, rngs=nnx.Rngs(0))
    assign_flat(ours, torch_to_flax(state_dict_numpy(ref), flat_shapes(ours)))

    n, h, w = shape
    x = np.random.default_rng(depth).normal(size=(n, h, w, 3)).astype(np.float32)
    with torch.no_grad():
        expected = list(ref(nchw(x)).values())
    got = jax.jit(lambda m, x: m(x))(ours, x)
    assert len(got) == len(expected) == 5
    for level, (g, e) in enumerate(zip(got, expected), start=2):
        e = nhwc(e)
        assert g.shape == e.shape, (level, g.shape, e.shape)
        err = np.abs(np.asarray(g) - e).max()
        assert err <= REL_TOL * np.abs(e).max(), f"P{level}: max abs err {err:.3g} vs max |ref| {np.abs(e).max():.3g}"
    # FPN P2 and P3 outputs + layer2's three stride-1 3x3 convolutions at 512x512; none below.
    assert len(winograd_calls) == (5 if shape[1] == 512 and jax.default_backend() == "cpu" else 0), winograd_calls
