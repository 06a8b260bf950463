"""Mask^X R-CNN heads and partial supervision: what the mask loss may and may not train."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskx_jax.detector import MaskRCNN
from maskx_jax.mask_head import mask_targets
from maskx_jax.weight_transfer import WeightTransfer, class_embedding
from tests.model_utils import synthetic_batch, tiny_config


def _mask_loss_grads(cfg, batch, key=0):
    model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return nnx.merge(graphdef, p, rest).losses(batch, jax.random.key(key))[1]["loss_mask"]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
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
