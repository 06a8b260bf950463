"""``model.dtype='bfloat16'``: convs/FCs compute in bfloat16, everything box- and loss-related in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskx_jax.config import base_config, validate
from maskx_jax.detector import MaskRCNN
from tests.model_utils import loss_and_grads, synthetic_batch, tiny_config


@pytest.fixture(scope="module")
def pair():
    """The same weights under float32 and bfloat16 compute."""
    f32 = MaskRCNN(tiny_config(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(f32)
    bf16 = MaskRCNN(tiny_config(dtype="bfloat16"), rngs=nnx.Rngs(1))
    nnx.update(bf16, state)
    return f32, bf16


def test_bfloat16_losses_and_gradients_track_float32(pair):
    batch = jax.tree.map(jnp.asarray, synthetic_batch(seed=3))
    (t32, parts32), _ = loss_and_grads(pair[0], batch)
    (t16, parts16), g16 = loss_and_grads(pair[1], batch)
    assert t16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in parts16.values())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g16)), "parameter gradients must stay float32"
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g16))
    assert float(t16) != float(t32), "bfloat16 compute should round differently from float32"
    # The RPN losses see the same anchors and targets under both dtypes: they agree to bfloat16's
    # ~3 significant digits. (The RoI losses do not: proposal top-k and NMS are discrete choices
    # that bfloat16 rounding of the objectness scores changes, so they sample other RoIs.)
    for k in ("loss_objectness", "loss_rpn_box_reg"):
        np.testing.assert_allclose(float(parts16[k]), float(parts32[k]), rtol=0.03, err_msg=k)


def test_bfloat16_features_track_float32(pair):
    images = jnp.asarray(synthetic_batch(seed=5).images)
    f32 = pair[0]._features(images)
    f16 = pair[1]._features(images)
    for level, (a, b) in enumerate(zip(f32, f16)):
        assert b.dtype == jnp.bfloat16
        err = float(jnp.max(jnp.abs(a - b.astype(jnp.float32))) / jnp.max(jnp.abs(a)))
        assert err < 0.05, f"P{level + 2}: relative error {err:.3f}"


def test_bfloat16_convolutions_really_run_in_bfloat16(pair):
    batch = synthetic_batch(seed=4)
    model = pair[1]
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x, hw: nnx.merge(graphdef, s).predict(x, hw))(
        state, jnp.asarray(batch.images), jnp.asarray(batch.image_sizes))
    conv_lines = [ln for ln in str(jaxpr).splitlines() if "conv_general_dilated" in ln]
    assert conv_lines, "no convolution in the predict graph"
    assert all("bf16[" in ln for ln in conv_lines), "a convolution runs in float32 under model.dtype=bfloat16"
    det = jax.jit(lambda s, x, hw: nnx.merge(graphdef, s).predict(x, hw))(
        state, jnp.asarray(batch.images), jnp.asarray(batch.image_sizes))
    assert det.boxes.dtype == jnp.float32 and det.scores.dtype == jnp.float32 and det.masks.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(det.masks)))


def test_config_accepts_only_known_dtypes():
    c = base_config()
    c.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype"):
        validate(c)
