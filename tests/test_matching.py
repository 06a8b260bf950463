"""Anchor / RoI matching and balanced sampling."""
import jax
import jax.numpy as jnp
import numpy as np

from maskx_jax.matching import match, sample


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


def test_sample_respects_quota_and_validity():
    labels = jnp.asarray(np.r_[np.ones(50), np.zeros(400), -np.ones(50)].astype(np.int32))
    valid = jnp.asarray(np.r_[np.ones(480), np.zeros(20)].astype(bool))
    idx, is_pos, ok = jax.jit(lambda l, v, k: sample(l, v, 64, 0.25, k))(labels, valid, jax.random.key(0))
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
