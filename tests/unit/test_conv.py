"""conv2d's spelled-out gradients (used on CPU so convolutions stay fast inside lax.switch) equal
JAX's own; ``model.conv_impl`` picks the implementation of every convolution when the model is built; the
XLA:CPU flag the entry points set is applied only when it is safe, and never by ``import maskx_jax``."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskx_jax.backends.cpu import xla_flags as xla_cpu
from maskx_jax.conv import conv2d
from tests.resources import ROOT

DN = ("NHWC", "HWIO", "NHWC")


def _reference(x, k, stride, padding):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((padding, padding),) * 2, dimension_numbers=DN)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (1, 1, 0), (3, 1, 0), (3, 1, 2), (5, 1, 2),
                                                     (3, 2, 1), (1, 2, 0), (7, 2, 3), (3, 2, 0), (4, 2, 1),
                                                     (5, 3, 2), (2, 3, 0)])
@pytest.mark.parametrize("images", [1, 2, 3])  # <= 2: the filter gradient stacks the images (conv.py)
def test_conv2d_value_and_gradients_equal_jax(kernel, stride, padding, images):
    rng = np.random.default_rng(kernel * 10 + stride + padding)
    x = jnp.asarray(rng.standard_normal((images, 11, 9, 6), np.float32))
    k = jnp.asarray(rng.standard_normal((kernel, kernel, 6, 5), np.float32))
    ours = jax.jit(lambda x, k: conv2d(x, k, stride, padding, "canonical"))
    ref = jax.jit(lambda x, k: _reference(x, k, stride, padding))
    y, y_ref = ours(x, k), ref(x, k)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    g = jnp.asarray(rng.standard_normal(y.shape, np.float32))
    gx, gk = jax.jit(lambda x, k: jax.vjp(lambda a, b: conv2d(a, b, stride, padding, "canonical"), x, k)[1](g))(x, k)
    gx_ref, gk_ref = jax.jit(lambda x, k: jax.vjp(lambda a, b: _reference(a, b, stride, padding), x, k)[1](g))(x, k)
    for a, b in ((gx, gx_ref), (gk, gk_ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_conv2d_gradients_inside_a_switch_equal_outside():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 7, 7, 16), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 16), np.float32) * 0.1)

    def loss(k, n):
        return jnp.sum(jax.nn.relu(conv2d(x[:n], k, 1, 1)) ** 2)

    outside = jax.jit(jax.grad(lambda k: loss(k, 4)))(k)
    inside = jax.jit(jax.grad(lambda k, i: jax.lax.switch(i, [lambda: loss(k, 4), lambda: loss(k, 8)])))(k, 0)
    np.testing.assert_allclose(np.asarray(inside), np.asarray(outside), rtol=1e-6, atol=1e-6)


def test_1x1_gradients_are_matrix_products_and_strided_1x1_has_no_dilated_convolution():
    """The layout of the 1x1 gradients is what makes them fast on CPU (see maskx_jax/conv.py): the filter
    gradient is a dot over all pixels, and the strided 1x1 (ResNet downsample) gradient has no
    dilated convolution (XLA's own gradient of a strided convolution)."""
    x = jnp.ones((2, 8, 8, 16), jnp.float32)
    k = jnp.ones((1, 1, 16, 4), jnp.float32)
    for stride in (1, 2):
        hlo = jax.jit(jax.grad(lambda x, k, s=stride: jnp.sum(conv2d(x, k, s, 0) ** 2), argnums=(0, 1))).lower(
            x, k).as_text()
        assert re.findall(r"(?:lhs|rhs)_dilate = \[(\d+, \d+)\]", hlo) == ["1, 1"] * 4, stride
        assert re.findall(r"stride = \[(\d+, \d+)\]", hlo) == ["1, 1"] * 2, stride
        # forward and input gradient are (1x1) convolutions; the filter gradient is a dot_general
        assert hlo.count("stablehlo.convolution") == 2 and "stablehlo.dot_general" in hlo, stride


def test_bfloat16_gradients_keep_their_dtypes():
    x = jnp.ones((2, 5, 5, 4), jnp.bfloat16)
    k = jnp.ones((3, 3, 4, 4), jnp.bfloat16)
    gx, gk = jax.grad(lambda x, k: conv2d(x, k, 1, 1).astype(jnp.float32).sum(), argnums=(0, 1))(x, k)
    assert gx.dtype == jnp.bfloat16 and gk.dtype == jnp.bfloat16
    assert float(gk[1, 1, 0, 0]) == 50.0  # the centre tap sees all 2 x 5 x 5 positions
    # stride 2 (gradients per input phase): the centre tap sees the 2 x 3 x 3 output positions
    gx, gk = jax.grad(lambda x, k: conv2d(x, k, 2, 1).astype(jnp.float32).sum(), argnums=(0, 1))(x, k)
    assert gx.dtype == jnp.bfloat16 and gk.dtype == jnp.bfloat16
    assert float(gk[1, 1, 0, 0]) == 18.0


def test_conv_impl_is_chosen_when_the_model_is_built():
    """``xla`` lowers the 1x1 filter gradient as XLA's convolution, ``canonical`` as a matrix product; a
    built detector carries ``model.conv_impl`` on every Conv2d; an unknown name is refused."""
    from flax import nnx

    from maskx_jax.detector import MaskRCNN
    from maskx_jax.layers import Conv2d
    from tests.model_utils import tiny_config

    x = jnp.ones((2, 8, 8, 16), jnp.float32)
    k = jnp.ones((1, 1, 16, 4), jnp.float32)

    def grad_hlo(impl):
        return jax.jit(jax.grad(lambda x, k: jnp.sum(conv2d(x, k, 1, 0, impl) ** 2), argnums=(0, 1))).lower(
            x, k).as_text()

    assert grad_hlo("xla").count("stablehlo.convolution") == 3 and "dot_general" not in grad_hlo("xla")
    assert grad_hlo("canonical").count("stablehlo.convolution") == 2
    with pytest.raises(ValueError, match="conv impl"):
        conv2d(x, k, 1, 0, "fast")
    model = MaskRCNN(tiny_config(conv_impl="xla"), rngs=nnx.Rngs(0))  # not the default: it must reach every conv
    assert {m.impl for _, m in nnx.iter_graph(model) if isinstance(m, Conv2d)} == {"xla"}


def _flags_after_import(env_extra: dict, first: str = "from maskx_jax.backends.cpu import xla_flags; "
                        "xla_flags.apply_cpu_defaults()") -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT_ENV)}
    env.update(env_extra)
    code = f"{first}; import os; print('FLAGS=' + os.environ.get('XLA_FLAGS', ''))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return [ln for ln in out.stdout.splitlines() if ln.startswith("FLAGS=")][-1][len("FLAGS="):]


@pytest.mark.skipif(xla_cpu._jaxlib_version() not in xla_cpu.VERIFIED_JAXLIB,
                    reason="the flag is only applied on verified jaxlib versions (tested below)")
def test_the_entry_points_add_the_cpu_flag_next_to_the_users_flags_and_import_does_not():
    flags = _flags_after_import({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert flags.split() == ["--xla_force_host_platform_device_count=2", xla_cpu.FLAG]
    # importing the package and building a model change nothing
    assert _flags_after_import({}, first="import maskx_jax, maskx_jax.train_lib, maskx_jax.predict") == ""


def test_the_flag_is_not_added_when_opted_out_set_by_the_user_or_too_late():
    assert _flags_after_import({xla_cpu.OPT_OUT_ENV: "0"}) == ""
    theirs = f"{xla_cpu.FLAG_NAME}=+LIBRARY_FUSION_TYPE_DOT"
    assert _flags_after_import({"XLA_FLAGS": theirs}) == theirs
    assert _flags_after_import({}, first="import jax; jax.devices(); from maskx_jax.backends.cpu import "
                               "xla_flags; xla_flags.apply_cpu_defaults()") == ""


def test_the_flag_is_not_added_on_an_unverified_jaxlib(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: (99, 0))
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_cpu.apply_cpu_defaults() is False and "XLA_FLAGS" not in os.environ
