"""The RPN losses read the head at their sampled anchors only (``RPNHead.at_anchors``).

What must hold: the head's outputs there equal the dense head's (every level, border pixels, every
anchor of a location), and the training losses and every gradient equal those of the form that
differentiates the dense head over all anchors (the reference below: the dense head, not detached,
gathered at the same anchors).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskx_jax import detector as detector_lib
from maskx_jax.detector import MaskRCNN
from maskx_jax.rpn import RPNHead, sample_anchors, sampled_rpn_losses
from tests.model_utils import loss_and_grads, synthetic_batch, tiny_config


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _dense_at(head: RPNHead, features, index):
    """The definition at_anchors must meet: the dense head, gathered."""
    logits, deltas = head(features)
    return (jnp.take_along_axis(logits, index, axis=1),
            jnp.take_along_axis(deltas, index[..., None], axis=1))


def _features(seed: int, n: int = 2, c: int = 16, sizes=((12, 20), (6, 10), (3, 5), (2, 3), (1, 2))):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32) for h, w in sizes]


def _border_and_random_indices(features, a: int, count: int, seed: int) -> np.ndarray:
    """[N, count] anchor indices: every level's four corner pixels (all anchors), the rest random."""
    starts = np.cumsum([0] + [f.shape[1] * f.shape[2] * a for f in features])
    picked = []
    for level, f in enumerate(features):
        h, w = f.shape[1:3]
        for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
            picked += [starts[level] + (y * w + x) * a + k for k in range(a)]
    rng = np.random.default_rng(seed)
    n = features[0].shape[0]
    out = np.stack([np.concatenate([picked, rng.integers(0, starts[-1], count - len(picked))]) for _ in range(n)])
    for i in range(n):
        rng.shuffle(out[i])
    return out.astype(np.int32)


def test_at_anchors_equals_dense_head():
    head = RPNHead(16, 3, rngs=nnx.Rngs(0))
    # torchvision's N(0, 0.01) init gives tiny outputs; larger weights make the comparison meaningful.
    for conv in (head.conv, head.cls_logits, head.bbox_pred):
        conv.kernel[...] = conv.kernel[...] * 30
        conv.bias[...] = jnp.linspace(-0.5, 0.5, conv.bias.shape[0])
    feats = _features(0)
    index = jnp.asarray(_border_and_random_indices(feats, 3, 96, seed=1))
    got_l, got_d = jax.jit(lambda f, i: head.at_anchors(f, i))(feats, index)
    ref_l, ref_d = jax.jit(lambda f, i: _dense_at(head, f, i))(feats, index)
    assert got_l.shape == (2, 96) and got_d.shape == (2, 96, 4)
    scale = float(jnp.max(jnp.abs(ref_d)))
    assert scale > 0.1
    np.testing.assert_allclose(np.asarray(got_l), np.asarray(ref_l), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(got_d), np.asarray(ref_d), rtol=0, atol=1e-5 * scale)


def test_at_anchors_bfloat16_keeps_dtype():
    head = RPNHead(16, 3, rngs=nnx.Rngs(0))
    feats = [f.astype(jnp.bfloat16) for f in _features(2)]
    index = jnp.asarray(_border_and_random_indices(feats, 3, 64, seed=3))
    logits, deltas = head.at_anchors(feats, index)
    assert logits.dtype == deltas.dtype == jnp.bfloat16
    ref_l, _ = _dense_at(head, [f.astype(jnp.float32) for f in feats], index)
    scale = float(jnp.max(jnp.abs(ref_l)))
    np.testing.assert_allclose(np.asarray(logits, np.float32), np.asarray(ref_l), atol=0.02 * scale)


def test_sampled_losses_and_gradients_equal_dense_form():
    """Same losses, same gradients for the features and the head's weights as the dense head's."""
    head = RPNHead(16, 3, rngs=nnx.Rngs(1))
    feats = _features(4)
    batch = synthetic_batch(seed=2, size=48)
    hw = (48, 80)
    anchors, _ = detector_lib.RPN(16, anchor_sizes=tiny_config().anchor_sizes, rngs=nnx.Rngs(0)).anchors(hw, feats)
    gt = (jnp.asarray(batch.gt_boxes), jnp.asarray(batch.gt_valid), jnp.asarray(batch.gt_crowd))
    key = jax.random.PRNGKey(7)
    graphdef, params = nnx.split(head)

    def sampled(p, f):
        s = sample_anchors(anchors, *gt, key, batch_size_per_image=64)
        lo, de = nnx.merge(graphdef, p).at_anchors(f, s.index)
        return sum(sampled_rpn_losses(lo, de, s))

    def dense(p, f):
        s = sample_anchors(anchors, *gt, key, batch_size_per_image=64)
        lo, de = _dense_at(nnx.merge(graphdef, p), f, s.index)
        return sum(sampled_rpn_losses(lo, de, s))

    (v1, (gp1, gf1)), (v2, (gp2, gf2)) = (jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(params, feats)
                                          for fn in (sampled, dense))
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves((gp1, gf1)), jax.tree.leaves((gp2, gf2))):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


def test_training_losses_and_gradients_equal_dense_head_reference(monkeypatch):
    """MaskRCNN.losses (detached dense head + at_anchors) against the same losses with the dense head
    differentiated and gathered: every loss and every parameter's gradient agree."""
    model = MaskRCNN(tiny_config(mask_mode="class_specific", mlp_fusion=False), rngs=nnx.Rngs(0))
    for conv in (model.rpn.head.cls_logits, model.rpn.head.bbox_pred):  # a head that is not ~0
        conv.kernel[...] = conv.kernel[...] * 20
    batch = jax.tree.map(jnp.asarray, synthetic_batch(seed=5))
    (total, parts), grads = loss_and_grads(model, batch, seed=3)

    undetached = MaskRCNN._rpn
    monkeypatch.setattr(MaskRCNN, "_rpn", lambda self, feats, hw, detached=False: undetached(self, feats, hw))
    monkeypatch.setattr(RPNHead, "at_anchors", _dense_at)
    (ref_total, ref_parts), ref_grads = loss_and_grads(model, batch, seed=3)

    for k in parts:
        np.testing.assert_allclose(float(parts[k]), float(ref_parts[k]), rtol=2e-5, err_msg=k)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    head_grads = 0
    for path, g in flat:
        r = ref_flat[path][...]
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(g[...]), np.asarray(r), rtol=0, atol=2e-5 * max(scale, 1e-8),
                                   err_msg=".".join(map(str, path)))
        head_grads += path[:2] == ("rpn", "head") and scale > 0
    assert head_grads == 6, "every RPN head parameter gets a gradient"
