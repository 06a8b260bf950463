"""The official Mask^X recipe (Detectron's, seg_every_thing) next to torchvision's: box predictor init,
bias learning rate and decay, the Fast R-CNN smooth-L1 beta, binarised mask targets, and the presets."""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskx_jax import config as config_lib
from maskx_jax import detector as detector_lib
from maskx_jax.box_head import FastRCNNPredictor, RoISamples, box_losses
from maskx_jax.boxes import encode
from maskx_jax.detector import MaskRCNN
from maskx_jax.layers import Linear
from maskx_jax.optim import make_optimizer
from model_utils import synthetic_batch, tiny_config


def test_detectron_box_predictor_init_statistics():
    p = FastRCNNPredictor(512, 81, init="detectron", rngs=nnx.Rngs(0))
    cls, box = np.asarray(p.cls_score.kernel[...]), np.asarray(p.bbox_pred.kernel[...])
    assert abs(cls.std() / 0.01 - 1) < 0.05 and abs(box.std() / 0.001 - 1) < 0.05
    assert abs(cls.mean()) < 0.01 * 0.05 and abs(box.mean()) < 0.001 * 0.05
    assert not np.asarray(p.cls_score.bias[...]).any() and not np.asarray(p.bbox_pred.bias[...]).any()
    # torchvision's default for comparison: U(+-1/sqrt(512)) weights and biases, std 1/sqrt(3 * 512)
    t = FastRCNNPredictor(512, 81, init="torch", rngs=nnx.Rngs(0))
    assert abs(np.asarray(t.bbox_pred.kernel[...]).std() * np.sqrt(3 * 512) - 1) < 0.05
    assert np.asarray(t.cls_score.bias[...]).any()
    with pytest.raises(ValueError, match="box predictor init"):
        FastRCNNPredictor(8, 3, init="xavier", rngs=nnx.Rngs(0))


def _toy_params():
    """An nnx.State like the train state's params: a kernel and a bias, both ones."""
    layer = Linear(2, 3, kernel_init=nnx.initializers.ones_init(), bias_init=nnx.initializers.ones_init(),
                   rngs=nnx.Rngs(0))
    return nnx.split(layer, nnx.Param)[1]


def _train_cfg(**overrides):
    t = config_lib.base_config().train
    t.unlock()
    t.update(dict(lr=0.1, warmup_steps=0, lr_steps=(), clip_grad_norm=0.0, **overrides))
    return t


@pytest.mark.parametrize("bias_factor,decay_biases", [(2.0, False), (1.0, True)])
def test_sgd_step_bias_lr_and_decay(bias_factor, decay_biases):
    params = _toy_params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = make_optimizer(_train_cfg(optimizer="sgd", momentum=0.9, weight_decay=0.5, bias_lr_factor=bias_factor,
                                   bias_weight_decay=decay_biases))
    updates, _ = tx.update(grads, tx.init(params), params)
    # first step: momentum buffer = grad + wd * p (decayed) or grad; update = -lr * buffer (* factor on biases)
    np.testing.assert_allclose(np.asarray(updates["kernel"][...]), -0.1 * (1 + 0.5), rtol=1e-6)
    bias = -0.1 * bias_factor * ((1 + 0.5) if decay_biases else 1.0)
    np.testing.assert_allclose(np.asarray(updates["bias"][...]), bias, rtol=1e-6)


def test_adamw_step_bias_lr_and_decay():
    params = _toy_params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = make_optimizer(_train_cfg(optimizer="adamw", weight_decay=0.5, bias_lr_factor=2.0, bias_weight_decay=False))
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is -lr * sign(g) (bias-corrected, eps aside); decoupled decay adds -lr * wd * p
    np.testing.assert_allclose(np.asarray(updates["kernel"][...]), -0.1 * (1 + 0.5), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["bias"][...]), -0.1 * 2.0, rtol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 1.0 / 9])
def test_box_loss_beta_against_its_formula(beta):
    rng = np.random.default_rng(0)
    n, s, k1 = 1, 6, 3
    rois = np.array([[[10, 10, 50, 60], [0, 0, 20, 20], [30, 5, 90, 40], [5, 5, 9, 9], [1, 2, 3, 4], [0, 0, 1, 1]]],
                    np.float32)
    gt = np.array([[[12, 8, 70, 66], [30, 0, 100, 45]]], np.float32)
    samples = RoISamples(rois=jnp.asarray(rois), is_pos=jnp.array([[True, True, True, False, False, False]]),
                         valid=jnp.array([[True] * 5 + [False]]), matched=jnp.array([[0, 0, 1, 0, 0, 0]], jnp.int32),
                         labels=jnp.array([[1, 2, 1, 0, 0, 0]], jnp.int32))
    logits = rng.normal(size=(n, s, k1)).astype(np.float32)
    deltas = rng.normal(size=(n, s, 4 * k1)).astype(np.float32) * 3  # large enough to cross beta = 1
    _, loss = box_losses(jnp.asarray(logits), jnp.asarray(deltas), samples, jnp.asarray(gt), beta=beta)
    expect = 0.0
    for i in range(3):
        label, m = int(samples.labels[0, i]), int(samples.matched[0, i])
        target = np.asarray(encode(jnp.asarray(gt[0, m:m + 1]), jnp.asarray(rois[0, i:i + 1]),
                                   (10.0, 10.0, 5.0, 5.0)))[0]
        x = np.abs(deltas[0, i, 4 * label:4 * label + 4] - target)
        expect += np.where(x < beta, 0.5 * x ** 2 / beta, x - 0.5 * beta).sum()
    np.testing.assert_allclose(float(loss), expect / 5, rtol=1e-5)


def test_binarized_mask_targets(monkeypatch):
    """With binarize_mask_targets the mask loss sees exactly (soft target >= 0.5)."""
    seen = []
    real = detector_lib.mask_loss_sum

    def spy(logits, targets, weight):
        jax.debug.callback(lambda t: seen.append(np.asarray(t)), targets)  # the values the compiled loss sees
        return real(logits, targets, weight)

    monkeypatch.setattr(detector_lib, "mask_loss_sum", spy)
    batch = synthetic_batch(0)
    for binarize in (False, True):
        # the static mask branch: one call of mask_loss_sum per loss
        model = MaskRCNN(tiny_config(mask_mode="class_agnostic", mlp_fusion=False, mask_slot_buckets=(),
                                     mask_chunk_slots=0, binarize_mask_targets=binarize), rngs=nnx.Rngs(0))
        jax.jit(lambda m: m.losses(batch, jax.random.PRNGKey(0)))(model)
        jax.effects_barrier()
    soft, hard = seen
    assert ((soft > 0.01) & (soft < 0.99)).any()  # RoIAlign gives fractional targets at the edges
    np.testing.assert_array_equal(hard, (soft >= 0.5).astype(hard.dtype))


def test_recipes_set_every_key_and_are_recognised():
    c = config_lib.base_config()
    assert config_lib.recipe_of(c) == "torchvision"  # the base config is torchvision's recipe
    config_lib.apply_recipe(c, "detectron")
    assert config_lib.recipe_of(c) == "detectron"
    assert (c.model.box_predictor_init, c.model.box_reg_beta, c.model.binarize_mask_targets) == ("detectron", 1.0, True)
    assert (c.train.bias_lr_factor, c.train.bias_weight_decay) == (2.0, False)
    assert (c.train.warmup_steps, c.train.warmup_factor) == (500, pytest.approx(1 / 3))
    c.model.box_reg_beta = 0.5
    assert config_lib.recipe_of(c) == "custom"
    with pytest.raises(ValueError, match="unknown recipe"):
        config_lib.apply_recipe(c, "mmdet")


@pytest.mark.parametrize("name", ["coco_voc2nonvoc_r50", "coco_nonvoc2voc_r50", "coco_voc2nonvoc_r101",
                                  "coco_nonvoc2voc_r101", "coco_voc2nonvoc_r50_agnostic", "coco_oracle_r50",
                                  "vg3k_boxes", "vg3k_maskx"])
def test_paper_configs_use_the_detectron_recipe(name):
    c = importlib.import_module(f"maskx_jax.configs.{name}").get_config()
    assert config_lib.recipe_of(c) == "detectron"


@pytest.mark.parametrize("name", ["coco_voc2nonvoc_r101", "coco_nonvoc2voc_r101"])
def test_r101_configs_follow_the_reference_schedule(name):
    t = importlib.import_module(f"maskx_jax.configs.{name}").get_config().train
    assert (t.batch_size, t.lr, t.steps, tuple(t.lr_steps)) == (8, 0.01, 180000, (120000, 160000))


def test_box_predictor_init_reaches_the_model_and_bad_values_are_refused():
    m = MaskRCNN(tiny_config(box_predictor_init="detectron"), rngs=nnx.Rngs(0))
    assert not np.asarray(m.roi_heads.box_predictor.cls_score.bias[...]).any()
    with pytest.raises(ValueError, match="box_predictor_init"):
        c = config_lib.base_config()
        c.data.set_a = "all"
        c.model.box_predictor_init = "xavier"
        config_lib.validate(c)


def test_model_defaults_have_one_source():
    """base_config's model section is DetectorConfig's defaults (same keys, values and types) except the one
    marked experiment choice, Mask^X; the model built from base_config is exactly that."""
    import dataclasses

    from maskx_jax.detector_config import DetectorConfig, model_defaults
    from maskx_jax.model_builder import detector_config

    model = config_lib.base_config().model.to_dict()
    defaults = model_defaults()
    assert sorted(model) == sorted(defaults)
    differ = {k: (model[k], v) for k, v in defaults.items() if model[k] != v or type(model[k]) is not type(v)}
    assert differ == {"mask_mode": ("transfer", "class_specific"), "mlp_fusion": (True, False)}
    built = detector_config(config_lib.base_config(), 11)
    assert built == dataclasses.replace(DetectorConfig(num_classes=11), mask_mode="transfer", mlp_fusion=True)
