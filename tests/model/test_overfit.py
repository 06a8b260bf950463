"""End-to-end learning check: the full detector (RPN, box head, Mask^X mask head, every loss)
can fit one small batch, and then ``predict`` finds each ground-truth object with its class.

A wrong target (box encoding, class labels, mask crops), a missing gradient or a broken
sampler shows up here as a loss that does not fall or detections that do not match."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from maskx_jax.boxes import box_iou
from maskx_jax.detector import MaskRCNN, make_predict_fn
from tests.model_utils import synthetic_batch, tiny_config

STEPS = 250


def test_detector_overfits_one_batch():
    model = MaskRCNN(tiny_config(), rngs=nnx.Rngs(0))
    batch = synthetic_batch(n=2, size=64)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(p, o, key):
        (total, parts), grads = jax.value_and_grad(
            lambda q: nnx.merge(graphdef, q, rest).losses(batch, key), has_aux=True)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, total, parts

    first = None
    for i in range(STEPS):
        params, opt, total, parts = step(params, opt, jax.random.key(i))
        first = float(total) if first is None else first
    assert float(total) < first / 3, (first, float(total), {k: float(v) for k, v in parts.items()})
    assert float(parts["loss_mask"]) < 0.3

    # compiled once (as every caller runs it), not op by op
    det = make_predict_fn(nnx.merge(graphdef, params, rest))(batch.images, batch.image_sizes)
    for i in range(batch.images.shape[0]):
        gt = batch.gt_boxes[i][batch.gt_valid[i]]
        gt_labels = batch.gt_classes[i][batch.gt_valid[i]]
        v = np.asarray(det.valid[i])
        boxes, labels = np.asarray(det.boxes[i])[v], np.asarray(det.labels[i])[v]
        iou = np.asarray(box_iou(jnp.asarray(gt), jnp.asarray(boxes)))
        for g in range(len(gt)):
            same = labels == gt_labels[g]
            assert same.any() and iou[g, same].max() >= 0.7, f"image {i} gt {g}: not found"
