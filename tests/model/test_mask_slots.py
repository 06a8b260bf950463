"""The mask branch runs on the supervised positives' slots only (in chunks, or on the smallest slot bucket that
holds them): the loss and every gradient must equal the static all-slots branch, whichever count is run."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskx_jax import active_chunks, detector
from maskx_jax.detector import MaskRCNN, mask_slot_index, mask_slot_sizes
from tests.model_utils import synthetic_batch, tiny_config


def test_slot_sizes_keep_buckets_below_the_cap_then_the_cap():
    assert mask_slot_sizes(128, (64, 16, 32)) == (16, 32, 64, 128)
    assert mask_slot_sizes(32, (16, 32, 64)) == (16, 32)
    assert mask_slot_sizes(8, ()) == (8,)
    assert mask_slot_sizes(8, (0, 8, 100)) == (8,)


@pytest.mark.parametrize("counts, expected", [((0, 0), 0), ((3, 1), 0), ((4, 0), 0), ((2, 5), 1),
                                              ((16, 16), 2), ((17, 3), 3), ((32, 32), 3)])
def test_slot_index_is_the_smallest_bucket_holding_the_largest_count(counts, expected):
    sizes = (4, 8, 16, 32)
    supervise = np.zeros((len(counts), 32), bool)
    for i, c in enumerate(counts):  # supervised slots anywhere among the 32: only the count matters
        supervise[i, np.random.default_rng(i).permutation(32)[:c]] = True
    assert int(mask_slot_index(jnp.asarray(supervise), sizes)) == expected


def _has_switch(fn, *args) -> bool:
    """Whether ``fn``'s jaxpr contains a ``cond`` (lax.switch lowers to one)."""
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return "cond[" in jaxpr or " cond " in jaxpr


def _loss_and_grads(cfg, batch):
    model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        total, parts = nnx.merge(graphdef, p, rest).losses(batch, jax.random.key(3))
        return total, parts

    (total, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return total, parts, grads


@functools.lru_cache(maxsize=1)
def _static_reference():
    """(batch, loss and gradients of the static all-slots branch) on Mask^X + MLP fusion (the tiny default), shared
    by the bucket and chunk tests. Only the first instance of each image has a mask: the supervised slots must
    be found among unsupervised positives and moved to the front."""
    batch = synthetic_batch(seed=1, has_mask=np.array([[True, False, False, False]] * 2))
    return batch, _loss_and_grads(tiny_config(mask_slot_buckets=(), mask_chunk_slots=0), batch)


def test_bucketed_mask_branch_equals_the_static_one():
    # 8 slots per image; buckets 1..7 so that the step takes a smaller branch whatever the count.
    batch, reference = _static_reference()
    _assert_same_loss_and_grads(reference, _loss_and_grads(tiny_config(mask_slot_buckets=(1, 2, 3, 4, 5, 6, 7),
                                                                        mask_chunk_slots=0), batch))


def _assert_same_loss_and_grads(reference, other):
    """Equal losses and gradients up to float summation order (the mask head really compared)."""
    (t0, p0, g0), (t1, p1, g1) = reference, other
    assert float(p0["loss_mask"]) > 0
    for k in p0:
        np.testing.assert_allclose(float(p1[k]), float(p0[k]), rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(float(t1), float(t0), rtol=1e-6)
    flat0, flat1 = jax.tree.leaves_with_path(g0), jax.tree.leaves(g1)
    changed = 0
    for (path, a), b in zip(flat0, flat1):
        scale = float(jnp.max(jnp.abs(a))) or 1.0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
        changed += "mask" in jax.tree_util.keystr(path) and scale > 0
    assert changed >= 4  # the mask head's gradients are really compared, not all zero


@pytest.mark.parametrize("chunk", [3, 1])
def test_chunked_mask_branch_equals_all_slots_at_once(monkeypatch, chunk):
    """model.mask_chunk_slots: the mask head run ``chunk`` slots per image at a time, for the chunks that hold a
    supervised slot only, gives the loss and gradients of all slots at once (Mask^X with MLP fusion, whose FC
    gradient is summed over the chunks; the box predictor's weights reach tau through a stop_gradient)."""
    calls = []

    def spying(fn, c, diff, data, slots, count):
        calls.append((slots[0].shape[1], c))
        return active_chunks.active_chunk_sum(fn, c, diff, data, slots, count)

    monkeypatch.setattr(detector, "active_chunk_sum", spying)
    batch, reference = _static_reference()
    chunked = _loss_and_grads(tiny_config(mask_slot_buckets=(4,), mask_chunk_slots=chunk), batch)
    assert calls == [(8, chunk)]  # one loop over all 8 slots, whatever the buckets (inference's only)
    _assert_same_loss_and_grads(reference, chunked)


def test_chunked_mask_loss_reaches_the_detector_weights_when_tau_is_not_detached():
    """stop_det_grad=False: the mask loss trains the box predictor's weights through tau; the chunked loop
    passes that gradient on like the static branch."""
    batch, _ = _static_reference()
    static = _loss_and_grads(tiny_config(mask_slot_buckets=(), mask_chunk_slots=0, stop_det_grad=False), batch)
    chunked = _loss_and_grads(tiny_config(mask_chunk_slots=3, stop_det_grad=False), batch)
    _assert_same_loss_and_grads(static, chunked)
    detached = _loss_and_grads(tiny_config(mask_chunk_slots=3), batch)
    cls = lambda grads: np.asarray(grads["roi_heads"]["box_predictor"]["cls_score"]["kernel"][...])
    assert np.abs(cls(chunked[2]) - cls(detached[2])).max() > 0  # the mask loss's share is really there


def test_the_switch_is_in_the_step_only_when_a_bucket_is_below_the_cap():
    batch = synthetic_batch(seed=1)

    def jaxpr(buckets, chunk):
        cfg = tiny_config(mask_slot_buckets=buckets, mask_chunk_slots=chunk)
        model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).losses(batch, jax.random.key(0))[0])(state))

    has_cond = lambda text: "cond[" in text or " cond " in text
    assert has_cond(jaxpr((2, 4), 0)) and not has_cond(jaxpr((), 0)) and not has_cond(jaxpr((8, 16), 0))
    # chunks: a loop over the chunks, skipping those past the count; the buckets unused in training
    chunked = jaxpr((2, 4), 2)
    assert ("while[" in chunked or "scan[" in chunked) and chunked.count("cond[") == 1  # the forward loop's skip


def test_predict_runs_the_mask_branch_on_the_valid_detections_only():
    """Inference: the smallest bucket holding every image's valid detections gives the static
    branch's masks on the valid rows (zeros elsewhere) and identical boxes, scores and labels."""
    batch = synthetic_batch(seed=2)
    images, sizes = jnp.asarray(batch.images), jnp.asarray(batch.image_sizes)

    def run(buckets, thresh):
        model = MaskRCNN(tiny_config(mask_slot_buckets=buckets, box_score_thresh=thresh), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        predict = lambda s: nnx.merge(graphdef, s).predict(images, sizes)
        return jax.jit(predict)(state), _has_switch(predict, state)

    scores = np.sort(np.asarray(run((), 0.0)[0].scores[0]))[::-1]
    # A threshold between the 4th and 5th score of image 0: some rows valid, some not.
    thresh = float((scores[3] + scores[4]) / 2)
    static, static_has_cond = run((), thresh)
    bucketed, bucketed_has_cond = run((2, 4, 6, 8), thresh)
    assert bucketed_has_cond and not static_has_cond
    valid = np.asarray(static.valid)
    counts = valid.sum(1)
    assert 0 < counts.max() < valid.shape[1], counts  # a smaller branch than all 10 rows is taken
    assert int(mask_slot_index(static.valid, mask_slot_sizes(10, (2, 4, 6, 8)))) == (counts.max() - 1) // 2
    for name in ("boxes", "scores", "labels", "valid"):
        np.testing.assert_array_equal(np.asarray(getattr(bucketed, name)), np.asarray(getattr(static, name)), name)
    got, want = np.asarray(bucketed.masks), np.asarray(static.masks)
    # Only summation order differs (the convolutions and the fusion FC see k rows instead of 10).
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=1e-5)
    assert np.all(got[~valid] == 0) and np.all(want[~valid] == 0)
    assert want[valid].std() > 0  # real masks are compared
