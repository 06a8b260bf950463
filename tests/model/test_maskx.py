"""Mask^X R-CNN heads and partial supervision: what the mask loss may and may not train."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskx_jax.detector import MaskRCNN
from maskx_jax.mask_head import mask_targets
from maskx_jax.weight_transfer import WeightTransfer, class_embedding
from tests.model_utils import synthetic_batch, tiny_config


@functools.lru_cache(maxsize=None)
def _mask_loss_fn(cfg):
    """(jitted ``(params, batch, key) -> (loss_mask, grads)``, params) of a model built from ``cfg`` (seed 0):
    one compile per config, shared by every batch of the same shapes."""
    model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, batch, key):
        return nnx.merge(graphdef, p, rest).losses(batch, key)[1]["loss_mask"]

    return jax.jit(jax.value_and_grad(loss)), params


def _mask_loss_grads(cfg, batch, key=0):
    fn, params = _mask_loss_fn(cfg)
    value, grads = fn(params, batch, jax.random.key(key))
    return float(value), grads


def _norm(tree) -> float:
    return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(seed=0)


def test_stop_det_grad_keeps_mask_loss_out_of_detection_weights(batch):
    value, grads = _mask_loss_grads(tiny_config(stop_det_grad=True), batch)
    assert value > 0
    bp = grads["roi_heads"]["box_predictor"]
    assert _norm(bp["cls_score"]["kernel"]) == 0.0 and _norm(bp["bbox_pred"]["kernel"]) == 0.0
    assert _norm(grads["roi_heads"]["weight_transfer"]) > 0.0


def test_without_stop_det_grad_the_mask_loss_trains_detection_weights_too(batch):
    _, grads = _mask_loss_grads(tiny_config(stop_det_grad=False), batch)
    bp = grads["roi_heads"]["box_predictor"]
    assert _norm(bp["cls_score"]["kernel"]) > 0.0 and _norm(bp["bbox_pred"]["kernel"]) > 0.0
    assert _norm(grads["roi_heads"]["weight_transfer"]) > 0.0


@pytest.mark.parametrize("transfer_input", ["cls", "box"])
def test_transfer_input_selects_which_weights_get_mask_gradient(batch, transfer_input):
    _, grads = _mask_loss_grads(tiny_config(stop_det_grad=False, transfer_input=transfer_input), batch)
    bp = grads["roi_heads"]["box_predictor"]
    cls_g, box_g = _norm(bp["cls_score"]["kernel"]), _norm(bp["bbox_pred"]["kernel"])
    assert (cls_g > 0) == (transfer_input == "cls") and (box_g > 0) == (transfer_input == "box")


def test_set_b_instances_contribute_nothing_to_the_mask_loss(batch):
    n, g = batch.gt_valid.shape
    set_b = batch.replace(gt_has_mask=np.zeros((n, g), bool))
    value, grads = _mask_loss_grads(tiny_config(), set_b)
    assert value == 0.0 and _norm(grads) == 0.0
    # Only image 0's instances supervised: scrambling image 1's (set-B) masks changes nothing.
    has = np.zeros((n, g), bool)
    has[0] = batch.gt_valid[0]
    part = batch.replace(gt_has_mask=has)
    scrambled = part.replace(gt_masks=np.concatenate([part.gt_masks[:1], 1.0 - part.gt_masks[1:]]))
    v1, _ = _mask_loss_grads(tiny_config(), part)
    v2, _ = _mask_loss_grads(tiny_config(), scrambled)
    assert v1 > 0 and v1 == v2
    # ...while scrambling the supervised image's masks does change it.
    v3, _ = _mask_loss_grads(tiny_config(), part.replace(gt_masks=1.0 - part.gt_masks))
    assert v3 != v1


def test_class_agnostic_has_one_channel_and_no_transfer():
    model = MaskRCNN(tiny_config(mask_mode="class_agnostic"), rngs=nnx.Rngs(0))
    assert model.roi_heads.weight_transfer is None
    assert model.roi_heads.mask_predictor.mask_fcn_logits.kernel[...].shape == (1, 1, 32, 1)
    w, _ = model.mask_class_weights()
    assert w.shape == (1, 32)


def test_class_specific_has_k_plus_1_channels():
    model = MaskRCNN(tiny_config(mask_mode="class_specific", mlp_fusion=False), rngs=nnx.Rngs(0))
    assert model.roi_heads.mask_predictor.mask_fcn_logits.kernel[...].shape == (1, 1, 32, 5)
    assert model.roi_heads.mask_predictor.mask_mlp is None


@pytest.mark.parametrize("kind,dim", [("cls", 64), ("box", 256), ("cls+box", 320)])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_tau_shapes_and_activations(kind, dim, layers):
    rngs = nnx.Rngs(0)
    rep, k1 = 64, 7
    cls_k = jax.random.normal(jax.random.key(1), (rep, k1))
    box_k = jax.random.normal(jax.random.key(2), (rep, 4 * k1))
    emb = class_embedding(cls_k, box_k, kind)
    assert emb.shape == (k1, dim)
    # class c's box embedding is its 4 bbox_pred rows (torch layout [4(K+1), rep]) concatenated
    if kind == "box":
        np.testing.assert_array_equal(emb[3], box_k.T[12:16].reshape(-1))
    for act in ("leaky_relu", "relu"):
        tau = WeightTransfer(rep, input_kind=kind, num_layers=layers, hidden=16, out_dim=8, activation=act, rngs=rngs)
        out = tau(cls_k, box_k)
        assert out.shape == (k1, 8)
        np.testing.assert_allclose(tau.transform(emb[jnp.array([3, 3, 1])]), out[jnp.array([3, 3, 1])], rtol=1e-6)
        # biases start at zero (MSRA init, zero bias)
        assert all(float(jnp.abs(getattr(tau, f"fc{i + 1}").bias[...]).max()) == 0.0 for i in range(layers))


def test_gathered_mask_logits_equal_the_full_computation():
    """Inference computes only the detected class's channel; it must equal all-K-then-select."""
    model = MaskRCNN(tiny_config(num_classes=40), rngs=nnx.Rngs(0))
    feats = jax.random.normal(jax.random.key(0), (6, 28, 28, 32))
    labels = jnp.array([1, 39, 5, 5, 0, 17])
    got = model.mask_logits(feats, labels)
    weight, _ = model.mask_class_weights()  # tau over all 40 classes
    full = jnp.einsum("rhwc,kc->rhwk", feats, weight) + model.roi_heads.mask_predictor.fusion(feats)[..., None]
    want = jnp.take_along_axis(full, labels[:, None, None, None], axis=3)[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mask_targets_resample_the_crop_in_the_roi_frame():
    crop = np.zeros((1, 16, 16), np.float32)
    crop[0, :, :8] = 1.0  # left half of the gt box is foreground
    gt = jnp.array([[10.0, 10.0, 42.0, 42.0]])
    same = mask_targets(gt, gt, jnp.asarray(crop), jnp.array([0]), resolution=28)
    assert np.allclose(same[0, :, :13], 1.0) and np.allclose(same[0, :, 15:], 0.0)
    # A RoI covering only the gt box's left half is foreground (but for its last columns, where
    # bilinear sampling blends across the mask edge); one right of the box is empty.
    left = mask_targets(jnp.array([[10.0, 10.0, 26.0, 42.0]]), gt, jnp.asarray(crop), jnp.array([0]))
    assert float(left[0, :, :-2].min()) > 0.99 and float(left[0, :, -1].min()) > 0.5
    outside = mask_targets(jnp.array([[50.0, 10.0, 80.0, 42.0]]), gt, jnp.asarray(crop), jnp.array([0]))
    assert float(outside.max()) == 0.0


def test_no_supervised_positive_gives_zero_mask_loss_and_gradient():
    none = synthetic_batch(seed=0, has_mask=np.zeros((2, 4), bool))
    value, grads = _mask_loss_grads(tiny_config(), none)
    assert value == 0.0 and _norm(grads) == 0.0


def test_random_embedding_control_ignores_the_detection_weights(batch):
    """transfer_input='random': tau reads fixed random class vectors (saved, never trained), so the mask
    logits do not move when the detection weights do, and no gradient reaches the detector or the vectors."""
    from maskx_jax.layers import FrozenStat
    from maskx_jax.weight_transfer import RANDOM_EMBED_DIM

    cfg = tiny_config(transfer_input="random", stop_det_grad=False, mlp_fusion=False)
    model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
    wt = model.roi_heads.weight_transfer
    assert isinstance(wt.embedding, FrozenStat) and wt.embedding[...].shape == (cfg.num_classes, RANDOM_EMBED_DIM)
    assert abs(float(jnp.std(wt.embedding[...])) - 1.0) < 0.1
    params = nnx.state(model, nnx.Param)
    assert "embedding" not in params["roi_heads"]["weight_transfer"]  # not trainable: the optimiser never sees it
    feats = jax.random.normal(jax.random.key(1), (3, 28, 28, cfg.mask_head_channels))
    labels = jnp.array([1, 2, 4])
    before = model.mask_logits(feats, labels)
    bp = model.roi_heads.box_predictor
    bp.cls_score.kernel[...] = bp.cls_score.kernel[...] + 1.0
    bp.bbox_pred.kernel[...] = bp.bbox_pred.kernel[...] * 3.0
    np.testing.assert_array_equal(np.asarray(model.mask_logits(feats, labels)), np.asarray(before))
    value, grads = _mask_loss_grads(cfg, batch)
    assert value > 0 and _norm(grads["roi_heads"]["weight_transfer"]) > 0
    assert _norm(grads["roi_heads"]["box_predictor"]) == 0.0  # nothing of the mask loss reaches the detector
    other = MaskRCNN(cfg, rngs=nnx.Rngs(1)).roi_heads.weight_transfer.embedding[...]
    assert not np.array_equal(np.asarray(other), np.asarray(wt.embedding[...]))  # drawn from the seed


def test_box_only_detector_has_no_mask_branch(batch):
    cfg = tiny_config(mask_mode="none", mlp_fusion=False)
    model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
    rh = model.roi_heads
    assert rh.mask_head is None and rh.mask_predictor is None and rh.weight_transfer is None
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    assert not any("mask" in n or "weight_transfer" in n for n in names)
    total, parts = jax.jit(lambda m: m.losses(batch, jax.random.key(0)))(model)
    assert set(parts) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    np.testing.assert_allclose(float(total), sum(float(v) for v in parts.values()), rtol=1e-6)
    # the box losses are those of a Mask R-CNN with the same weights (the mask branch adds only loss_mask)
    full = MaskRCNN(tiny_config(mask_mode="class_agnostic", mlp_fusion=False), rngs=nnx.Rngs(0))
    _, with_mask = jax.jit(lambda m: m.losses(batch, jax.random.key(0)))(full)
    for k, v in parts.items():
        np.testing.assert_allclose(float(v), float(with_mask[k]), rtol=1e-5, err_msg=k)
    det = jax.jit(lambda m: m.predict(batch.images, batch.image_sizes))(model)
    assert det.masks is None and det.boxes.shape == (2, cfg.detections_per_img, 4)
    with pytest.raises(ValueError, match="box-only"):
        model.mask_class_weights()


def test_skipped_loss_groups_are_not_computed_and_the_rest_unchanged(batch):
    model = MaskRCNN(tiny_config(), rngs=nnx.Rngs(0))
    losses = jax.jit(lambda m, skip: m.losses(batch, jax.random.key(0), skip=skip), static_argnums=1)
    _, every = losses(model, ())
    _, mask_only = losses(model, ("rpn", "box"))
    assert set(mask_only) == {"loss_mask"}
    np.testing.assert_allclose(float(mask_only["loss_mask"]), float(every["loss_mask"]), rtol=1e-6)
    _, no_rpn = losses(model, ("rpn",))
    assert set(no_rpn) == {"loss_classifier", "loss_box_reg", "loss_mask"}
    with pytest.raises(ValueError, match="unknown loss groups"):
        losses(model, ("boxes",))


@pytest.mark.parametrize("freeze,skipped", [("", ()), ("detector", ("rpn", "box")), ("backbone", ()),
                                            ("backbone,rpn", ("rpn",)), ("rpn,box_head", ()),
                                            ("backbone,mask_head,box_head", ("box", "mask"))])
def test_frozen_parts_skip_their_losses(freeze, skipped):
    from maskx_jax.optim import skipped_losses

    assert skipped_losses(freeze) == skipped


def _independent_transfer_logits(model, features, labels, activation):
    """Mask^X logits written out from the named parameters in plain jnp (no library code): each RoI's class
    embedding (cls_score column + its 4 bbox_pred columns), tau (fc1, activation, fc2), a bias-free 1x1 conv
    on the conv5 features, plus the MLP fusion FC of the flattened (NHWC) conv5 features."""
    rh = model.roi_heads
    cls_k, box_k = rh.box_predictor.cls_score.kernel[...], rh.box_predictor.bbox_pred.kernel[...]
    emb = jnp.stack([jnp.concatenate([cls_k[:, c]] + [box_k[:, 4 * c + j] for j in range(4)]) for c in labels])
    wt = rh.weight_transfer
    hidden = emb @ wt.fc1.kernel[...] + wt.fc1.bias[...]
    hidden = jnp.where(hidden > 0, hidden, 0.1 * hidden) if activation == "leaky_relu" else jnp.maximum(hidden, 0)
    weight = hidden @ wt.fc2.kernel[...] + wt.fc2.bias[...]  # [R, C]
    per_class = jnp.sum(features * weight[:, None, None, :], axis=-1)  # [R, 28, 28]
    mlp = rh.mask_predictor.mask_mlp
    fused = (features.reshape(features.shape[0], -1) @ mlp.kernel[...] + mlp.bias[...]).reshape(per_class.shape)
    return per_class, fused


@pytest.mark.parametrize("activation", ["leaky_relu", "relu"])
def test_mlp_fusion_and_tau_against_an_independent_computation(activation):
    cfg = tiny_config(mlp_fusion=True, transfer_activation=activation)
    model = MaskRCNN(cfg, rngs=nnx.Rngs(3))
    # non-trivial fusion weights (its init is N(0, 0.001)) and biases, so every term shows
    mlp = model.roi_heads.mask_predictor.mask_mlp
    mlp.kernel[...] = jax.random.normal(jax.random.key(5), mlp.kernel[...].shape) * 0.02
    mlp.bias[...] = jax.random.normal(jax.random.key(6), mlp.bias[...].shape)
    wt = model.roi_heads.weight_transfer
    wt.fc1.bias[...] = jax.random.normal(jax.random.key(7), wt.fc1.bias[...].shape)
    features = jax.random.normal(jax.random.key(1), (4, 28, 28, cfg.mask_head_channels))
    labels = [1, 4, 2, 4]
    per_class, fused = _independent_transfer_logits(model, features, labels, activation)
    got = model.mask_logits(features, jnp.array(labels))
    np.testing.assert_allclose(np.asarray(got), np.asarray(per_class + fused), rtol=1e-4, atol=1e-4)
    # the fusion term is the same for every class: it is added to each class's logits
    for c in range(1, cfg.num_classes):
        other = model.mask_logits(features, jnp.full((4,), c))
        own, _ = _independent_transfer_logits(model, features, [c] * 4, activation)
        np.testing.assert_allclose(np.asarray(other - own), np.asarray(fused), rtol=1e-4, atol=1e-4)
    # leaky_relu and relu give different masks from the same weights (some hidden units are negative)
    twin = MaskRCNN(tiny_config(mlp_fusion=True, transfer_activation="relu" if activation == "leaky_relu"
                                else "leaky_relu"), rngs=nnx.Rngs(3))
    nnx.update(twin, nnx.state(model))
    assert not np.allclose(np.asarray(twin.mask_logits(features, jnp.array(labels))), np.asarray(got), atol=1e-5)


def test_mlp_fusion_is_in_the_training_loss(batch):
    """The fusion FC gets gradient from the mask loss, and changing it changes the loss."""
    cfg = tiny_config(mlp_fusion=True)
    value, grads = _mask_loss_grads(cfg, batch)
    fusion = grads["roi_heads"]["mask_predictor"]["mask_mlp"]
    assert _norm(fusion["kernel"]) > 0 and _norm(fusion["bias"]) > 0
    model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
    model.roi_heads.mask_predictor.mask_mlp.bias[...] = jnp.full_like(model.roi_heads.mask_predictor.mask_mlp.bias[...],
                                                                      3.0)
    fn, _ = _mask_loss_fn(cfg)  # the compiled loss; the same graph and non-parameter state (seed 0)
    shifted = float(fn(nnx.split(model, nnx.Param, ...)[1], batch, jax.random.key(0))[0])
    assert abs(shifted - value) > 1e-3
