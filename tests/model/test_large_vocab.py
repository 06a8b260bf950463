"""Large vocabulary (K = 3000 classes, masks from tau for every class): the gathered mask path equals
the all-classes path, its compiled cost does not grow with K, and predict runs at K = 3000."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from maskx_jax import mask_head, predict
from maskx_jax.detector import MaskRCNN
from model_utils import tiny_config

K1 = 3001  # 3000 classes + background

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools RLE decode on NumPy 2


def _full_path_logits(model: MaskRCNN, features, labels):
    """The naive reference: tau on all K+1 classes, K+1-channel logits, then each RoI's channel."""
    weight, bias = model.mask_class_weights()  # [K+1, C]
    assert weight.shape[0] == model.cfg.num_classes and bias is None
    all_logits = mask_head.mask_logits(features, weight, None)  # [R, 28, 28, K+1]
    picked = jnp.take_along_axis(all_logits, labels[:, None, None, None], axis=3)[..., 0]
    fused = model.roi_heads.mask_predictor.fusion(features)
    return picked if fused is None else picked + fused


@pytest.mark.parametrize("transfer_input", ["cls+box", "box"])
def test_gathered_equals_full_at_3000_classes(transfer_input):
    model = MaskRCNN(tiny_config(num_classes=K1, transfer_input=transfer_input), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(6, 28, 28, model.cfg.mask_head_channels)), jnp.float32)
    labels = jnp.asarray([1, 3000, 1500, 2999, 7, 3000], jnp.int32)
    got = model.mask_logits(features, labels)
    want = _full_path_logits(model, features, labels)
    assert got.shape == (6, 28, 28)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # and jitted, as predict runs it
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, f, lab: nnx.merge(graphdef, s).mask_logits(f, lab))(state, features, labels)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(want), rtol=1e-5, atol=1e-5)


def _mask_branch_cost(num_classes: int, rois: int = 32) -> tuple[int, float]:
    """(temp bytes, flops) of the compiled mask branch ``mask_logits`` for ``rois`` detections."""
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: MaskRCNN(tiny_config(num_classes=num_classes), rngs=nnx.Rngs(0))))
    f = lambda s, x, lab: nnx.merge(graphdef, s).mask_logits(x, lab)
    compiled = jax.jit(f).lower(state, jax.ShapeDtypeStruct((rois, 28, 28, 32), jnp.float32),
                                jax.ShapeDtypeStruct((rois,), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return int(compiled.memory_analysis().temp_size_in_bytes), float(cost["flops"])


def test_mask_branch_cost_does_not_grow_with_classes():
    temp_81, flops_81 = _mask_branch_cost(81)
    temp_3k, flops_3k = _mask_branch_cost(K1)
    assert flops_3k == flops_81, (flops_81, flops_3k)
    assert temp_3k == temp_81, (temp_81, temp_3k)  # no [K+1, d] embedding, no [R, 28, 28, K+1] logits


def test_vg3k_config_builds_3000_class_maskx():
    from maskx_jax.configs.vg3k_maskx import NUM_CLASSES, get_config
    from maskx_jax import config as config_lib
    from maskx_jax.data.classes import COCO_CATEGORIES, parse_set_a
    from maskx_jax.model_builder import build_model

    cfg = get_config()
    cfg.data.train_json, cfg.data.train_images = "vg/train.json", "vg/images"  # given on the command line
    config_lib.validate(cfg)
    assert NUM_CLASSES >= 3001 and cfg.model.mask_mode == "transfer"
    names = ("__background__",) + tuple(n for _, n in COCO_CATEGORIES) + tuple(
        f"vg class {i}" for i in range(NUM_CLASSES - 81))
    assert len(parse_set_a(cfg.data.set_a, names)) == 80  # set A: the COCO classes
    model = nnx.eval_shape(lambda: build_model(cfg, NUM_CLASSES))  # abstract: R-50 at 3001 classes
    weight, bias = nnx.eval_shape(lambda m: m.mask_class_weights(), model)
    assert weight.shape == (NUM_CLASSES, cfg.model.mask_head_channels) and bias is None


def test_predict_cli_at_3000_classes(tmp_path):
    from maskx_jax.checkpoint import save_detector
    from PIL import Image

    # random weights score every class about 1/3001: keep every detection (box_score_thresh 0)
    model = MaskRCNN(tiny_config(num_classes=K1, box_score_thresh=0.0), rngs=nnx.Rngs(0))
    save_detector(str(tmp_path / "ckpt"), model)
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "im")
    for i, size in enumerate([(64, 64), (48, 80)]):
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(tmp_path / "im" / f"{i}.png")
    assert predict.main(["--checkpoint", str(tmp_path / "ckpt"), "--images", str(tmp_path / "im"), "--output",
                         str(tmp_path / "out"), "--min-size", "64", "--max-size", "96", "--score-thresh", "0",
                         "--no-progress"]) == 0
    results = json.load(open(tmp_path / "out" / predict.RESULTS_FILE))
    images = json.load(open(tmp_path / "out" / predict.IMAGES_FILE))
    assert len(images["categories"]) == K1 - 1 and len(images["images"]) == 2
    assert results and all(1 <= r["category_id"] <= K1 - 1 for r in results)
    assert os.path.isfile(tmp_path / "out" / "0.png") and os.path.isfile(tmp_path / "out" / "1.png")
