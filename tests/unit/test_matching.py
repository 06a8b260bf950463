"""Anchor / RoI matching and balanced sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskx_jax.boxes import box_area, box_inter_union
from maskx_jax.matching import CROWD_IOA_THRESH, match, sample


def _m(boxes, gt, valid=None, crowd=None, **kw):
    gt = np.asarray(gt, np.float32)
    valid = np.ones(len(gt), bool) if valid is None else np.asarray(valid)
    crowd = np.zeros(len(gt), bool) if crowd is None else np.asarray(crowd)
    matched, labels = match(jnp.asarray(boxes, jnp.float32), jnp.asarray(gt), valid, crowd, **kw)
    return np.asarray(matched), np.asarray(labels)


def test_thresholds_and_argmax():
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    boxes = [[0, 0, 10, 10],  # IoU 1 with gt0
             [20, 20, 30, 31],  # IoU 10/11 with gt1
             [0, 0, 10, 20],  # IoU 0.5 with gt0: ignored between 0.3 and 0.7
             [50, 50, 60, 60]]  # no overlap: background
    matched, labels = _m(boxes, gt, fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=False)
    assert labels.tolist() == [1, 1, -1, 0]
    assert matched[:2].tolist() == [0, 1]


def test_low_quality_matches_make_each_gts_best_anchor_foreground():
    gt = [[0, 0, 10, 10]]
    boxes = [[0, 0, 10, 20], [0, 0, 10, 40]]  # IoU 0.5 and 0.25
    _, labels = _m(boxes, gt, fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=False)
    assert labels.tolist() == [-1, 0]
    _, labels = _m(boxes, gt, fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=True)
    assert labels.tolist() == [1, 0]


def test_padding_and_crowd_are_never_matched_and_crowd_regions_are_ignored():
    gt = [[0, 0, 10, 10], [100, 100, 140, 140], [0, 0, 10, 10]]
    valid = [True, True, False]
    crowd = [False, True, False]
    boxes = [[0, 0, 10, 10], [105, 105, 125, 125], [200, 200, 210, 210]]
    matched, labels = _m(boxes, gt, valid, crowd, fg_thresh=0.5, bg_thresh=0.5, allow_low_quality=False)
    assert labels.tolist() == [1, -1, 0]  # inside the crowd box: ignored, not background
    assert matched[0] == 0
    # Exactly 70% inside the crowd region is not "mostly inside" (> 0.7): background, whatever the shapes.
    for boxes in ([[0, 0, 10, 10]], [[0, 0, 10, 10]] * 7):
        _, labels = _m(boxes, [[3, 0, 20, 10]], [True], [True], fg_thresh=0.5, bg_thresh=0.5, allow_low_quality=False)
        assert (labels == 0).all()


def _dense_match(boxes, gt, valid, crowd, fg_thresh, bg_thresh, allow_low_quality):
    """All gts at once, one [M, G] IoU matrix: the plain statement of the rules ``match`` follows."""
    inter, union = box_inter_union(boxes, gt)
    iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
    usable = valid & ~crowd
    iou = jnp.where(usable[None, :], iou, -1.0)
    best = jnp.max(iou, axis=1)
    matched = jnp.argmax(iou, axis=1).astype(jnp.int32)
    labels = jnp.where(best >= fg_thresh, 1, jnp.where(best < bg_thresh, 0, -1))
    if allow_low_quality:
        gt_best = jnp.max(iou, axis=0)
        is_best = (iou == gt_best[None, :]) & usable[None, :] & (gt_best[None, :] > 0)
        labels = jnp.where(jnp.any(is_best, axis=1), 1, labels)
    area = box_area(boxes)[:, None]
    in_crowd = jnp.any((area > 0) & (inter > CROWD_IOA_THRESH * area) & crowd[None, :] & valid[None, :], axis=1)
    return matched, jnp.where((labels == 0) & in_crowd, -1, labels).astype(jnp.int32)


@pytest.mark.parametrize("g,chunk", [(1, 8), (13, 3), (100, 8), (17, 1)])
@pytest.mark.parametrize("allow_low_quality", [False, True])
def test_chunked_match_equals_matching_all_gts_at_once(g, chunk, allow_low_quality):
    rng = np.random.default_rng(g * 10 + chunk)
    # Integer coordinates on a coarse grid, and gts repeated across chunk boundaries: many exact
    # IoU ties, which must go to the first gt as a single argmax would.
    def rand_boxes(n):
        xy = rng.integers(0, 40, (n, 2)) * 4
        return np.concatenate([xy, xy + rng.integers(1, 12, (n, 2)) * 4], 1).astype(np.float32)
    boxes = rand_boxes(3000)
    gt = rand_boxes(g)
    if g > 4:
        gt[g - 1] = gt[1]
        gt[g // 2] = gt[0]
    for trial in range(4):
        valid = rng.random(g) < [1.0, 0.7, 0.2, 0.0][trial]  # all, most, few, no valid gts
        if trial == 2 and g > 1:
            valid[:] = False
            valid[-1] = True  # only the last slot: the loop must reach it
        crowd = valid & (rng.random(g) < 0.2)
        kw = dict(fg_thresh=0.5, bg_thresh=0.3, allow_low_quality=allow_low_quality)
        got = jax.jit(lambda *a: match(*a, **kw, gt_chunk=chunk))(boxes, gt, valid, crowd)
        want = _dense_match(jnp.asarray(boxes), jnp.asarray(gt), jnp.asarray(valid), jnp.asarray(crowd), **kw)
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_chunked_match_under_vmap_with_different_gt_counts():
    """A batch whose images need different trip counts: each image equals its own match."""
    rng = np.random.default_rng(0)
    boxes = np.concatenate([xy := rng.uniform(0, 300, (500, 2)), xy + rng.uniform(5, 120, (500, 2))], 1)
    gt = np.stack([np.concatenate([p := rng.uniform(0, 300, (30, 2)), p + rng.uniform(5, 120, (30, 2))], 1)
                   for _ in range(3)]).astype(np.float32)
    valid = np.arange(30)[None, :] < np.array([[3], [30], [0]])
    crowd = np.zeros_like(valid)
    kw = dict(fg_thresh=0.7, bg_thresh=0.3, allow_low_quality=True)
    boxes = jnp.asarray(boxes, jnp.float32)
    matched, labels = jax.jit(jax.vmap(lambda g, v, c: match(boxes, g, v, c, **kw)))(gt, valid, crowd)
    for i in range(3):
        m_i, l_i = _dense_match(boxes, jnp.asarray(gt[i]), jnp.asarray(valid[i]), jnp.asarray(crowd[i]), **kw)
        np.testing.assert_array_equal(np.asarray(labels[i]), np.asarray(l_i))
        np.testing.assert_array_equal(np.asarray(matched[i]), np.asarray(m_i))
    assert (np.asarray(labels[2]) == 0).all(), "no gt: all background"


@pytest.mark.parametrize("fg,bg,low_quality", [(0.7, 0.3, True), (0.5, 0.5, False)])  # RPN, RoI heads
def test_match_equals_torchvision_matcher(fg, bg, low_quality):
    """torchvision's ``Matcher`` on the valid gts vs ``match`` on the padded gt slots (no crowd)."""
    import torch  # a test dependency, as in the other parity tests
    from torchvision.models.detection._utils import Matcher
    from torchvision.ops import box_iou

    rng = np.random.default_rng(7)
    def rand_boxes(n, grid):
        if grid:  # integer grid: exact IoU ties between gts, and between candidates
            xy = rng.integers(0, 30, (n, 2)) * 8.0
            return np.concatenate([xy, xy + rng.integers(1, 10, (n, 2)) * 8.0], 1).astype(np.float32)
        xy = rng.uniform(0, 300, (n, 2))
        return np.concatenate([xy, xy + rng.uniform(4, 120, (n, 2))], 1).astype(np.float32)
    for grid in (False, True):
        for n_gt in (1, 7, 20):
            boxes, gt = rand_boxes(4000, grid), rand_boxes(n_gt, grid)
            ref = Matcher(fg, bg, allow_low_quality_matches=low_quality)(
                box_iou(torch.from_numpy(gt), torch.from_numpy(boxes))).numpy()
            slots = np.zeros((32, 4), np.float32)
            slots[:n_gt] = gt
            matched, labels = _m(boxes, slots, np.arange(32) < n_gt, None, fg_thresh=fg, bg_thresh=bg,
                                 allow_low_quality=low_quality)
            want = np.where(ref >= 0, 1, np.where(ref == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
            np.testing.assert_array_equal(labels, want)
            np.testing.assert_array_equal(matched[ref >= 0], ref[ref >= 0])


def test_match_passes_no_gradient_to_the_candidates():
    gt = jnp.asarray([[0.0, 0.0, 10.0, 10.0]])
    def f(b):
        _, labels = match(b, gt, jnp.ones(1, bool), jnp.zeros(1, bool), fg_thresh=0.5, bg_thresh=0.5,
                          allow_low_quality=True)
        return jnp.sum(b * labels[:, None])
    grad = jax.grad(f)(jnp.asarray([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]))
    np.testing.assert_array_equal(np.asarray(grad), [[1, 1, 1, 1], [0, 0, 0, 0]])


def test_sample_respects_quota_and_validity():
    labels = jnp.asarray(np.r_[np.ones(50), np.zeros(400), -np.ones(50)].astype(np.int32))
    valid = jnp.asarray(np.r_[np.ones(480), np.zeros(20)].astype(bool))
    idx, is_pos, ok = jax.jit(lambda lab, v, k: sample(lab, v, 64, 0.25, k))(labels, valid, jax.random.key(0))
    idx, is_pos, ok = map(np.asarray, (idx, is_pos, ok))
    assert ok.sum() == 64 and is_pos.sum() == 16
    assert (np.asarray(labels)[idx[is_pos]] == 1).all() and (np.asarray(labels)[idx[ok & ~is_pos]] == 0).all()
    assert is_pos[:16].all(), "positives come first"
    assert len(set(idx[ok].tolist())) == 64, "no duplicates"
    # few positives: negatives fill the rest
    labels2 = labels.at[3:50].set(0)
    _, is_pos2, ok2 = sample(labels2, valid, 64, 0.25, jax.random.key(1))
    assert int(is_pos2.sum()) == 3 and int(ok2.sum()) == 64
    # different keys give different subsets
    idx3, _, _ = sample(labels, valid, 64, 0.25, jax.random.key(2))
    assert set(np.asarray(idx3).tolist()) != set(idx.tolist())
