"""ResNet variants: every depth converts from torchvision by name, and freeze_at cuts gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision
from flax import nnx

from convert.from_torch import convert_resnet
from maskx_jax.resnet import ResNet
from tests.torch_utils import state_dict_numpy


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_every_depth_matches_torchvision_layout(depth):
    """Same tensors, same shapes: conversion leaves no key unused and no parameter unfilled."""
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    body = convert_resnet(state_dict_numpy(ref), depth)
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(body)))
    n_ref = sum(v.numel() for k, v in ref.state_dict().items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))
    assert n_ours == n_ref


@pytest.mark.parametrize("freeze_at,trained", [(0, ["conv1", "layer1", "layer4"]), (2, ["layer2", "layer4"]),
                                               (5, [])])
def test_freeze_at_cuts_gradients(freeze_at, trained):
    body = ResNet(18, freeze_at=freeze_at, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(body, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)

    def loss(p):
        return sum(jnp.sum(o ** 2) for o in nnx.merge(graphdef, p, rest)(x))

    grads = jax.grad(loss)(params)
    # Frozen stages hold no nnx.Param at all (so no gradient and no optimiser state).
    norms = {name: 0.0 for name in ("conv1", "layer1", "layer2", "layer3", "layer4")}
    for path, g in nnx.to_flat_state(grads):
        norms[str(path[0])] += float(jnp.abs(g[...]).sum())
    frozen = {"conv1": freeze_at >= 1, "layer1": freeze_at >= 2, "layer2": freeze_at >= 3,
              "layer3": freeze_at >= 4, "layer4": freeze_at >= 5}
    for name, is_frozen in frozen.items():
        if is_frozen:
            assert norms[name] == 0.0, name
        else:
            assert norms[name] > 0.0, name
    for name in trained:
        assert norms[name] > 0.0


def test_bad_depth_and_freeze_at_are_refused():
    with pytest.raises(ValueError, match="depth"):
        ResNet(42, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="freeze_at"):
        ResNet(18, freeze_at=7, rngs=nnx.Rngs(0))
