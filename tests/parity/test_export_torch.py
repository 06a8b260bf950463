"""Train here, deploy in PyTorch: every kind of model exported by ``convert.to_torch`` gives, in torchvision, the
detections and masks it gives in JAX.

For each kind (class-specific, class-agnostic, Mask^X with and without MLP fusion, box-only, and a FrozenBN
backbone with non-trivial statistics) a toy R-18-FPN is built in JAX, exported, loaded into
``convert.torch_models.build_detector`` with ``strict=True`` and calibrated there so that it detects like a
trained model (``tests.torch_utils.calibrate_maskrcnn_``: random weights give degenerate detections); the
calibrated RPN and box-predictor tensors are brought back into the JAX weights and the model exported again
(so Mask^X's tau sees the calibrated detection weights). Then the JAX model and the torch export run on
three images of different sizes, and the detections are matched one to one with the parity table's
tolerances: box IoU >= 0.99, same label, score within 1e-3, pasted mask IoU (at 0.5) >= 0.98.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.mapping import canonical_torch_key, dotted_to_path, torch_tensor_to_flax
from convert.to_torch import detector_state_dict
from convert.torch_models import build_detector
from maskx_jax.boxes import box_iou
from maskx_jax.detector import MaskRCNN, make_predict_fn
from maskx_jax.paste import paste_masks
from maskx_jax.state_utils import abstract_module, flat_arrays, from_flat
from maskx_jax.transform import preprocess, resize_boxes
from tests.model_utils import tiny_config
from tests.torch_utils import calibrate_maskrcnn_, state_dict_numpy

MIN_SIZE, MAX_SIZE = 96, 128
# Three sizes whose resized images share one padded canvas (96x128): one compilation per kind.
SIZES = ((100, 120), (90, 118), (110, 130))
KINDS = {
    "class_specific": dict(mask_mode="class_specific", mlp_fusion=False),
    "class_agnostic": dict(mask_mode="class_agnostic", mlp_fusion=False),
    "transfer": dict(mask_mode="transfer", mlp_fusion=False),
    "transfer_mlp": dict(mask_mode="transfer", mlp_fusion=True),
    "box_only": dict(mask_mode="none", mlp_fusion=False),
    "frozen_bn_transfer_mlp": dict(mask_mode="transfer", mlp_fusion=True, norm="frozen_bn", freeze_at=2),
}
# Calibrated on the torch side, then copied back (see the module docstring).
CALIBRATED = ("rpn.head.cls_logits.weight", "rpn.head.bbox_pred.weight", "rpn.head.bbox_pred.bias",
              "roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
              "roi_heads.box_predictor.bbox_pred.weight")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = []
    for h, w in SIZES:  # smooth random images, so detections are not just noise
        base = rng.uniform(0, 255, size=(h // 8 + 1, w // 8 + 1, 3))
        img = np.kron(base, np.ones((8, 8, 1)))[:h, :w]
        out.append(np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8))
    return out


def _torch_images(images):
    return [torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images]


def _config(kind: str):
    return tiny_config(num_classes=7, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                       detections_per_img=40, mask_slot_buckets=(), **KINDS[kind])


def _jax_weights(cfg) -> dict:
    flat = flat_arrays(MaskRCNN(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    for path in flat:  # non-trivial FrozenBN statistics (identity ones would hide a layout mistake)
        if path[-1] in ("running_mean", "bias") and "bn" in str(path):
            flat[path] = rng.normal(0, 0.1, flat[path].shape).astype(np.float32)
        elif path[-1] in ("running_var", "weight") and "bn" in str(path):
            flat[path] = rng.uniform(0.5, 1.5, flat[path].shape).astype(np.float32)
    return flat


def _torch_model(cfg, flat):
    model = build_detector(dataclasses.asdict(cfg), min_size=MIN_SIZE, max_size=MAX_SIZE)
    state = {k: torch.from_numpy(np.array(v)) for k, v in detector_state_dict(flat, cfg).items()}
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, images):
    """(kind, cfg, the JAX model, its torch export), calibrated alike."""
    cfg = _config(request.param)
    flat = _jax_weights(cfg)
    ref = _torch_model(cfg, flat)
    calibrate_maskrcnn_(ref, _torch_images(images))
    calibrated = state_dict_numpy(ref)
    fc6_chw = (cfg.fpn_channels, cfg.box_roi_size, cfg.box_roi_size)
    for key in CALIBRATED:
        path = dotted_to_path(canonical_torch_key(key), flat)
        flat[path] = torch_tensor_to_flax(path, calibrated[key], fc6_chw).astype(np.float32)
    ours = from_flat(abstract_module(lambda: MaskRCNN(cfg, rngs=nnx.Rngs(0))), flat)
    return request.param, cfg, ours, _torch_model(cfg, flat)


def _detect_jax(model, imgs):
    predict = make_predict_fn(model)
    results = []
    for img in imgs:  # one image at a time: torchvision's padding of a single image (up to a multiple of 32)
        batch = preprocess([img], min_size=MIN_SIZE, max_size=MAX_SIZE)
        det = jax.device_get(predict(batch.images, batch.image_sizes))
        boxes = resize_boxes(det.boxes, batch.image_sizes, batch.original_sizes)[0]
        h, w = batch.original_sizes[0]
        v = det.valid[0]
        masks = (None if det.masks is None
                 else np.asarray(paste_masks(jnp.asarray(det.masks[0][v]), jnp.asarray(boxes[v]), int(h), int(w))))
        results.append(dict(boxes=np.asarray(boxes[v]), scores=det.scores[0][v], labels=det.labels[0][v],
                            masks=masks))
    assert predict.traced_shapes == [(1, 96, 128, 3)]  # three sizes, one canvas, one compilation
    return results


def test_export_detects_like_the_jax_model(exported, images):
    kind, cfg, ours, ref = exported
    with torch.no_grad():
        expected = ref(_torch_images(images))
    got = _detect_jax(ours, images)
    for i, (e, g) in enumerate(zip(expected, got)):
        n_ref = len(e["boxes"])
        assert n_ref >= 10, f"{kind} image {i}: only {n_ref} reference detections; the test would mean little"
        assert len(set(e["labels"].tolist())) >= 3, f"{kind} image {i}: detections of fewer than 3 classes"
        assert len(g["boxes"]) == n_ref, f"{kind} image {i}: {len(g['boxes'])} detections vs torch's {n_ref}"
        iou = np.asarray(box_iou(jnp.asarray(e["boxes"].numpy()), jnp.asarray(g["boxes"])))
        used = np.zeros(len(g["boxes"]), bool)
        for j in range(n_ref):  # reference rows are sorted by score
            cand = np.where(~used & (g["labels"] == e["labels"][j].item()))[0]
            assert len(cand), f"{kind} image {i} det {j}: no unmatched detection with label {e['labels'][j].item()}"
            best = cand[np.argmax(iou[j, cand])]
            used[best] = True
            assert iou[j, best] >= 0.99, f"{kind} image {i} det {j}: box IoU {iou[j, best]:.4f}"
            assert abs(g["scores"][best] - e["scores"][j].item()) <= 1e-3
            if cfg.mask_mode == "none":
                assert "masks" not in e and g["masks"] is None
                continue
            a, b = e["masks"][j, 0].numpy() > 0.5, g["masks"][best] > 0.5
            union = np.logical_or(a, b).sum()
            m_iou = 1.0 if union == 0 else np.logical_and(a, b).sum() / union
            assert m_iou >= 0.98, f"{kind} image {i} det {j}: mask IoU {m_iou:.4f}"


def test_mask_logits_of_the_export_equal_tau_and_fusion(exported):
    """The torch mask predictor's logits on the same conv features equal the JAX model's for every class."""
    kind, cfg, ours, ref = exported
    if cfg.mask_mode == "none":  # a box-only export is torchvision's Faster R-CNN: no mask branch at all
        assert getattr(ref.roi_heads, "mask_predictor", None) is None and not ref.roi_heads.has_mask()
        return
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 14, 14, cfg.mask_head_channels)).astype(np.float32)
    with torch.no_grad():
        logits = ref.roi_heads.mask_predictor(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()  # [R, K+1, 28, 28]
    feats = ours.roi_heads.mask_predictor.features(jnp.asarray(x))
    for c in range(1, cfg.num_classes):
        want = np.asarray(ours.mask_logits(feats, jnp.full((3,), c)))
        np.testing.assert_allclose(logits[:, c], want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=f"{kind} {c}")


def test_aligned_roi_align_is_refused():
    cfg = tiny_config(aligned=True)
    with pytest.raises(ValueError, match="aligned=True"):
        build_detector(dataclasses.asdict(cfg))
