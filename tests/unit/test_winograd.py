"""Winograd F(4x4, 3x3) (maskx_jax/backends/cpu/winograd.py): values and both gradients equal XLA's direct
convolution within float32 rounding of the transforms, and conv2d takes it exactly where the rule says."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskx_jax import conv as conv_lib
from maskx_jax.backends.cpu import winograd

DN = ("NHWC", "HWIO", "NHWC")
# Outputs differ from the direct form by ~5e-6 of their scale (module docstring); 3e-5 leaves room
# for larger sums while still failing on any wrong coefficient (a wrong one is off by O(1)).
REL_TOL = 3e-5


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _direct(x, k, padding):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((padding, padding),) * 2, dimension_numbers=DN)


def _value_and_grads(fn, x, k, g):
    y, vjp = jax.vjp(fn, x, k)
    return (y, *vjp(g))


def _assert_close(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = float(jnp.max(jnp.abs(want)))
    err = float(jnp.max(jnp.abs(got - want)))
    assert err <= REL_TOL * scale, f"{what}: max abs err {err:.3g} vs max |direct| {scale:.3g}"


@pytest.mark.parametrize("n, h, w, c, o, padding", [
    (1, 8, 8, 4, 4, 1),      # whole tiles
    (2, 11, 9, 6, 5, 1),     # partial tiles on both sides, C != O
    (3, 7, 13, 3, 8, 0),     # VALID
    (2, 6, 10, 5, 7, 2),     # output larger than the input
    (1, 3, 3, 2, 3, 0),      # a single output pixel
    (5, 14, 14, 16, 16, 1),  # mask-head-like RoIs
])
def test_values_and_gradients_equal_direct(n, h, w, c, o, padding):
    rng = np.random.default_rng(n * 100 + h + w + padding)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, o)) / np.sqrt(9 * c), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, h + 2 * padding - 2, w + 2 * padding - 2, o)), jnp.float32)
    got = jax.jit(lambda x, k, g: _value_and_grads(lambda a, b: winograd.conv2d(a, b, padding), x, k, g))(x, k, g)
    want = jax.jit(lambda x, k, g: _value_and_grads(lambda a, b: _direct(a, b, padding), x, k, g))(x, k, g)
    for a, b, what in zip(got, want, ("output", "input gradient", "kernel gradient")):
        _assert_close(a, b, what)


def test_at_detector_scale():
    """A shape the rule sends to Winograd (FPN/layer2-like: 512 tiles, 128 channels)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 64, 64, 128)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 128, 128)) * np.sqrt(2 / (9 * 128)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 64, 64, 128)), jnp.float32)
    assert winograd.applies(x.shape, k.shape, 1, 1, x.dtype)
    got = jax.jit(lambda x, k, g: _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, 1, 1), x, k, g))(x, k, g)
    want = jax.jit(lambda x, k, g: _value_and_grads(lambda a, b: _direct(a, b, 1), x, k, g))(x, k, g)
    for a, b, what in zip(got, want, ("output", "input gradient", "kernel gradient")):
        _assert_close(a, b, what)


def test_gradients_inside_a_switch_equal_outside():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 10, 10, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 8, 8)) * 0.2, jnp.float32)

    def loss(k, n):
        return jnp.sum(jax.nn.relu(winograd.conv2d(x[:n], k, 1)) ** 2)

    outside = jax.jit(jax.grad(lambda k: loss(k, 2)))(k)
    inside = jax.jit(jax.grad(lambda k, i: jax.lax.switch(i, [lambda: loss(k, 2), lambda: loss(k, 4)])))(k, 0)
    np.testing.assert_allclose(np.asarray(inside), np.asarray(outside), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x_shape, kernel_shape, stride, padding, dtype, expected", [
    ((2, 128, 128, 256), (3, 3, 256, 256), 1, 1, jnp.float32, True),    # FPN P2 of a 512x512 image
    ((2, 64, 64, 128), (3, 3, 128, 128), 1, 1, jnp.float32, True),      # 512 tiles: the bound
    ((2, 60, 64, 128), (3, 3, 128, 128), 1, 1, jnp.float32, False),     # 480 tiles
    ((2, 32, 32, 256), (3, 3, 256, 256), 1, 1, jnp.float32, False),     # 128 tiles (layer3, P4)
    ((2, 128, 128, 64), (3, 3, 64, 64), 1, 1, jnp.float32, False),      # 64 channels (layer1)
    ((2, 128, 128, 256), (3, 3, 256, 256), 1, 1, jnp.bfloat16, False),  # float32 only
    ((2, 128, 128, 256), (3, 3, 256, 256), 2, 1, jnp.float32, False),   # strided
    ((2, 128, 128, 256), (1, 1, 256, 256), 1, 0, jnp.float32, False),   # 1x1
    ((2, 128, 128, 256), (3, 3, 256, 256), 1, 3, jnp.float32, False),   # padding the gradient cannot mirror
])
def test_rule(x_shape, kernel_shape, stride, padding, dtype, expected):
    assert winograd.applies(x_shape, kernel_shape, stride, padding, dtype) is expected


def test_conv2d_dispatch_and_switch_off():
    x = jnp.ones((2, 64, 64, 128), jnp.float32)
    k = jnp.ones((3, 3, 128, 128), jnp.float32)
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda a, b: conv_lib.conv2d(a, b, 1, 1))(x, k))
    small = jnp.ones((1, 16, 16, 128), jnp.float32)
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda a, b: conv_lib.conv2d(a, b, 1, 1))(small, k))
    for impl in ("canonical", "xla"):  # model.conv_impl without Winograd: XLA's direct convolution, bitwise
        assert "conv_general_dilated" in str(jax.make_jaxpr(lambda a, b: conv_lib.conv2d(a, b, 1, 1, impl))(x, k))
        rng = np.random.default_rng(2)
        xr = jnp.asarray(rng.standard_normal((2, 64, 64, 128)), jnp.float32)
        np.testing.assert_array_equal(np.asarray(jax.jit(lambda a, b: conv_lib.conv2d(a, b, 1, 1, impl))(xr, k)),
                                      np.asarray(jax.jit(lambda a, b: _direct(a, b, 1))(xr, k)))


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from maskx_jax import conv as conv_lib
from maskx_jax.backends.cpu import winograd
assert jax.device_count() == 8
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((8, 32, 32, 128)), jnp.float32)
k = jnp.asarray(rng.standard_normal((3, 3, 128, 128)) / 34.0, jnp.float32)
assert winograd.applies(x.shape, k.shape, 1, 1, x.dtype)
g = jnp.asarray(rng.standard_normal((8, 32, 32, 128)), jnp.float32)
def value_and_grads(x, k, g):
    y, vjp = jax.vjp(lambda a, b: conv_lib.conv2d(a, b, 1, 1), x, k)
    return (y, *vjp(g))
mesh = Mesh(np.array(jax.devices()), ("data",))
data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
sharded = jax.jit(value_and_grads, in_shardings=(data, rep, data), out_shardings=(data, data, rep))
y8, gx8, gk8 = sharded(jax.device_put(x, data), jax.device_put(k, rep), jax.device_put(g, data))
y1, gx1, gk1 = jax.jit(value_and_grads)(x, k, g)
assert len(y8.sharding.device_set) == 8
for a, b in ((y8, y1), (gx8, gx1), (gk8, gk1)):
    err = float(jnp.max(jnp.abs(a - b))) / float(jnp.max(jnp.abs(b)))
    assert err < 1e-5, err
print("ok")
"""


def test_batch_sharded_over_8_devices_equals_1():
    """Under data parallelism the transforms and the 36 products are partitioned by XLA's SPMD pass
    (the tiles axis follows the image axis; the kernel gradient's sum over tiles becomes an all-reduce)."""
    import os
    import subprocess
    import sys

    from tests.resources import ROOT as root

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip())
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
