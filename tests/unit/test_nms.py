"""maskx_jax.nms against torchvision.ops.nms / batched_nms (same kept set, same order)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from maskx_jax.nms import batched_nms_padded, nms_keep_mask, nms_padded

nms_jit = jax.jit(nms_padded, static_argnums=(3, 4))
batched_jit = jax.jit(batched_nms_padded, static_argnums=(4, 5))


def random_boxes(rng, n, integer=False, hi=200.0, max_wh=80.0):
    """[n, 4] float32 XYXY; dense enough that many pairs overlap."""
    xy = rng.uniform(0.0, hi, (n, 2))
    wh = rng.uniform(1.0, max_wh, (n, 2))
    b = np.concatenate([xy, xy + wh], axis=1)
    if integer:  # integer boxes make exact IoU values (e.g. 1/2) and threshold ties likely
        b = np.round(b)
    return b.astype(np.float32)


def torch_nms(boxes, scores, valid, thr):
    """torchvision.ops.nms on the valid subset, mapped back to padded indices."""
    sub = np.nonzero(valid)[0]
    keep = torchvision.ops.nms(torch.from_numpy(boxes[sub]), torch.from_numpy(scores[sub]), thr).numpy()
    return sub[keep]


def kept(idx, ok):
    idx, ok = np.asarray(idx), np.asarray(ok)
    # Valid entries form a prefix; padding points at index 0.
    n = int(ok.sum())
    assert ok[:n].all() and not ok[n:].any()
    assert (idx[n:] == 0).all()
    return idx[:n]


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision_random(thr):
    n = 200
    for seed in range(24):
        rng = np.random.default_rng(seed)
        boxes = random_boxes(rng, n, integer=seed % 2 == 1)
        scores = (rng.permutation(n).astype(np.float32) + 1.0) / n  # distinct: no ties
        valid = rng.uniform(size=n) > 0.15
        ref = torch_nms(boxes, scores, valid, thr)
        got = kept(*nms_jit(boxes, scores, valid, thr, n))
        np.testing.assert_array_equal(got, ref, err_msg=f"seed={seed} thr={thr}")


def test_nms_ties_follow_torchvision_stable_order():
    n = 200
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        boxes = random_boxes(rng, n, hi=100.0, max_wh=40.0)
        scores = rng.integers(0, 5, n).astype(np.float32)  # many equal scores
        valid = np.ones(n, bool)
        np.testing.assert_array_equal(kept(*nms_jit(boxes, scores, valid, 0.5, n)),
                                      torch_nms(boxes, scores, valid, 0.5))


def test_max_output_truncation_and_padding():
    rng = np.random.default_rng(7)
    n = 200
    boxes = random_boxes(rng, n, hi=400.0, max_wh=40.0)
    scores = rng.permutation(n).astype(np.float32)
    valid = np.ones(n, bool)
    ref = torch_nms(boxes, scores, valid, 0.5)
    assert len(ref) > 20
    idx, ok = nms_jit(boxes, scores, valid, 0.5, 20)
    assert idx.shape == (20,) and idx.dtype == jnp.int32 and ok.dtype == jnp.bool_
    np.testing.assert_array_equal(kept(idx, ok), ref[:20])
    # Longer than the input: everything kept, rest padded.
    idx, ok = nms_jit(boxes, scores, valid, 0.5, 260)
    assert idx.shape == (260,)
    np.testing.assert_array_equal(kept(idx, ok), ref)


def test_invalid_entries_neither_kept_nor_suppress():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    valid = np.array([False, True, True, False])
    idx, ok = nms_padded(boxes, scores, valid, 0.5, 4)
    # Box 0 is invalid, so box 1 survives and suppresses box 2; box 3 is invalid.
    np.testing.assert_array_equal(kept(idx, ok), [1])
    idx, ok = nms_padded(boxes, scores, np.zeros(4, bool), 0.5, 3)
    assert not np.asarray(ok).any() and (np.asarray(idx) == 0).all()


def test_threshold_is_strict_and_compared_as_double():
    # IoU exactly 1/2: not suppressed at threshold 0.5 (strict >).
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], np.float32)  # inter 50 / union 100
    # IoU exactly 3/10: float32(0.3) = 0.30000001 > 0.3, so torchvision suppresses at 0.3.
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 3]], np.float32)  # inter 30 / union 100
    s = np.array([1.0, 0.5], np.float32)
    v = np.ones(2, bool)
    for boxes, thr in [(a, 0.5), (b, 0.3), (b, 0.2999), (a, 0.4999)]:
        np.testing.assert_array_equal(kept(*nms_padded(boxes, s, v, thr, 2)), torch_nms(boxes, s, v, thr))
    assert len(torch_nms(b, s, v, 0.3)) == 1 and len(torch_nms(a, s, v, 0.5)) == 2


def _pair_iou(xp, a, b):
    """Row-wise IoU of [m, 4] boxes written in torchvision's operation order (xp: np or jnp)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = xp.maximum(xp.minimum(a[:, 2], b[:, 2]) - xp.maximum(a[:, 0], b[:, 0]), np.float32(0))
    h = xp.maximum(xp.minimum(a[:, 3], b[:, 3]) - xp.maximum(a[:, 1], b[:, 1]), np.float32(0))
    inter = w * h
    return inter / (area_a + area_b - inter)


def test_iou_rounding_matches_torch_at_the_threshold():
    """IoU must be rounded as torch does: areas, (area_i + area_j) and - inter each in float32.

    XLA's CPU/GPU code generators contract a*b+c into fused multiply-adds, which changes the
    float32 IoU of many pairs by an ulp. Pairs are picked where that happens (observed on XLA's own
    fused elementwise IoU, plus a modelled FMA in the union), and the threshold is set between the
    two candidate values, so any such rounding difference inside NMS flips the decision. Each pair
    is embedded among far-away boxes so the vectorised loop body is exercised.
    """
    rng = np.random.default_rng(11)
    m = 20000
    a = random_boxes(rng, m)
    b = (a + rng.normal(0.0, 10.0, a.shape)).astype(np.float32)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1.0)
    separate = _pair_iou(np, a, b)  # what torch computes (no contraction in its CPU kernel)
    xla = np.asarray(jax.jit(functools.partial(_pair_iou, jnp))(a, b))
    w = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), np.float32(0))
    h = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), np.float32(0))
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    fma_union = ((area_a + area_b).astype(np.float64) - w.astype(np.float64) * h).astype(np.float32)
    fused = (w * h) / fma_union
    positive = (w * h) > 0
    xla_cases = np.nonzero((xla != separate) & positive)[0][:4]
    fma_cases = np.nonzero((fused != separate) & positive)[0][:4]
    assert len(fma_cases) == 4
    cases = [(i, xla[i]) for i in xla_cases] + [(i, fused[i]) for i in fma_cases]
    n = 64
    far = np.stack([np.arange(n - 2) * 50.0 + 10000.0, np.full(n - 2, 10000.0)], axis=1)
    far = np.concatenate([far, far + 20.0], axis=1).astype(np.float32)
    scores = np.linspace(1.0, 0.1, n).astype(np.float32)
    valid = np.ones(n, bool)
    for i, other in cases:
        thr = float(min(separate[i], other))
        boxes = np.concatenate([a[i : i + 1], b[i : i + 1], far])
        ref = torch_nms(boxes, scores, valid, thr)
        assert len(ref) == n - (separate[i] > thr)  # the decision really hinges on the rounding
        np.testing.assert_array_equal(kept(*nms_jit(boxes, scores, valid, thr, n)), ref)


@pytest.mark.parametrize("thr", [0.5, 0.7])
def test_batched_nms_matches_torchvision(thr):
    n = 300
    for seed in range(10):
        rng = np.random.default_rng(200 + seed)
        boxes = random_boxes(rng, n)
        scores = (rng.permutation(n).astype(np.float32) + 1.0) / n
        cats = rng.integers(0, 4, n).astype(np.int32)
        valid = rng.uniform(size=n) > 0.1
        sub = np.nonzero(valid)[0]
        ref = torchvision.ops.batched_nms(
            torch.from_numpy(boxes[sub]), torch.from_numpy(scores[sub]), torch.from_numpy(cats[sub]), thr
        ).numpy()
        got = kept(*batched_jit(boxes, scores, cats, valid, thr, n))
        np.testing.assert_array_equal(got, sub[ref], err_msg=f"seed={seed}")


def test_batched_nms_compares_categories_exactly():
    # Identical boxes of different categories never suppress each other, whatever their size.
    boxes = np.array([[0, 0, 1e6, 1e6]] * 3 + [[0, 0, 10, 10]] * 2, np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    cats = np.array([0, 1, 0, 2, 2], np.int32)
    idx, ok = batched_nms_padded(boxes, scores, cats, np.ones(5, bool), 0.5, 5)
    np.testing.assert_array_equal(kept(idx, ok), [0, 1, 3])


def test_keep_mask():
    rng = np.random.default_rng(9)
    n = 150
    boxes = random_boxes(rng, n)
    scores = rng.permutation(n).astype(np.float32)
    valid = rng.uniform(size=n) > 0.2
    cats = rng.integers(0, 3, n).astype(np.int32)
    mask = np.asarray(nms_keep_mask(boxes, scores, valid, 0.6))
    np.testing.assert_array_equal(np.nonzero(mask)[0], np.sort(torch_nms(boxes, scores, valid, 0.6)))
    mask = np.asarray(nms_keep_mask(boxes, scores, valid, 0.6, categories=cats, max_output=10))
    idx, ok = batched_nms_padded(boxes, scores, cats, valid, 0.6, 10)
    np.testing.assert_array_equal(np.nonzero(mask)[0], np.sort(kept(idx, ok)))


def test_jit_vmap_batch_and_single_trace():
    traces = []

    @functools.partial(jax.jit, static_argnums=(3, 4))
    def batched(boxes, scores, valid, thr, k):
        traces.append(boxes.shape)  # runs once per trace, not per call
        return jax.vmap(lambda b, s, v: nms_padded(b, s, v, thr, k))(boxes, scores, valid)

    n, k = 120, 40
    for seed in range(3):
        rng = np.random.default_rng(300 + seed)
        boxes = np.stack([random_boxes(rng, n), random_boxes(rng, n)])
        scores = np.stack([rng.permutation(n), rng.permutation(n)]).astype(np.float32)
        valid = rng.uniform(size=(2, n)) > 0.2
        idx, ok = batched(boxes, scores, valid, 0.5, k)
        assert idx.shape == (2, k) and ok.shape == (2, k)
        for i in range(2):
            np.testing.assert_array_equal(kept(idx[i], ok[i]), torch_nms(boxes[i], scores[i], valid[i], 0.5)[:k])
    assert len(traces) == 1
