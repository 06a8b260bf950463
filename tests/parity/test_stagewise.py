"""Stage-wise Mask^X on an existing box detector: Faster R-CNN conversion and ``train.freeze``.

A randomly initialised torchvision Faster R-CNN (nothing can be downloaded) is saved as a state
dict, converted through the CLI entry point, and used as ``train.init_checkpoint`` of a Mask^X
model with ``train.freeze=detector``. Training runs on an R-18-FPN Faster R-CNN (torchvision's
``FasterRCNN`` on ``resnet_fpn_backbone('resnet18')``, the same key layout as
``fasterrcnn_resnet50_fpn``) at 64x64 so it takes seconds; the R-50 file itself is converted,
round-tripped and checked for detection parity with torchvision.
"""
from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx

import train_fixtures as F
from convert import from_torch, to_torch
from convert.classes import COCO80_ROWS, parse_classes, select_classes
from convert.mapping import ConversionError
from maskx_jax import config as config_lib
from maskx_jax import optim, train_lib
from maskx_jax.checkpoint import load_detector, load_flat, read_meta
from maskx_jax.detector import MaskRCNN, make_predict_fn
from maskx_jax.state_utils import flat_variables
from maskx_jax.transform import preprocess, resize_boxes
from tests.torch_utils import calibrate_maskrcnn_, randomize_batchnorm_

SYNTHETIC_CLASSES = 11  # 10 shapes + background
MASK_KEYS = [f"roi_heads.mask_head.{i}.0.{p}" for i in range(4) for p in ("weight", "bias")] + [
    f"roi_heads.mask_predictor.{m}.{p}" for m in ("conv5_mask", "mask_fcn_logits") for p in ("weight", "bias")]
MASK_BRANCH = ("roi_heads.mask_head.", "roi_heads.mask_predictor.", "roi_heads.weight_transfer.")


def _name(path) -> str:
    return ".".join(map(str, path))


def _r18_fasterrcnn(num_classes: int, seed: int = 0) -> torch.nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(seed)
    model = FasterRCNN(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3), num_classes)
    randomize_batchnorm_(model, seed=seed)
    return model


@pytest.fixture(scope="module")
def r50_pth(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                                 num_classes=SYNTHETIC_CLASSES)
    randomize_batchnorm_(model)
    path = tmp_path_factory.mktemp("r50") / "fasterrcnn.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_fasterrcnn_converts_names_what_it_lacks_and_round_trips(r50_pth, tmp_path, capsys):
    src, ref = r50_pth
    out, back = tmp_path / "flax", tmp_path / "back.pth"
    assert from_torch.main(["--arch", "fasterrcnn_resnet50_fpn", "--checkpoint", str(src), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Faster R-CNN R-50-FPN (box detector), 11 classes" in printed
    for key in MASK_KEYS:  # the report names every key a Mask R-CNN has and this file lacks
        assert f"  {key}\n" in printed, key
    assert "roi_heads.weight_transfer" in printed and "mask_mlp" in printed and "train.freeze=detector" in printed
    meta = read_meta(str(out))
    assert meta["kind"] == "box_detector" and meta["config"]["num_classes"] == SYNTHETIC_CLASSES
    assert not [p for p in load_flat(str(out)) if _name(p).startswith(MASK_BRANCH)]
    with pytest.raises(ValueError, match="box-only detector"):
        load_detector(str(out))
    # back to torch: bitwise, and to_torch checks a strict load into fasterrcnn_resnet50_fpn
    assert to_torch.main(["--checkpoint", str(out), "--output", str(back)]) == 0
    assert "loads into torchvision fasterrcnn_resnet50_fpn with strict=True" in capsys.readouterr().out
    got, want = torch.load(back, weights_only=True), ref.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_arch_mixups_are_refused_with_a_hint(r50_pth, tmp_path, capsys):
    src, _ = r50_pth
    out = tmp_path / "out"
    assert from_torch.main(["--arch", "maskrcnn_resnet50_fpn", "--checkpoint", str(src), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "12 missing keys" in err and "use --arch fasterrcnn_resnetNN_fpn" in err
    maskrcnn = tmp_path / "maskrcnn.pth"
    torch.save(torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=SYNTHETIC_CLASSES).state_dict(), maskrcnn)
    assert from_torch.main(["--arch", "fasterrcnn_resnet50_fpn", "--checkpoint", str(maskrcnn),
                            "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "12 unexpected keys" in err and "roi_heads.mask_head.0.0.weight" in err and "use --arch maskrcnn" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_classes_coco80_reindexes_predictor_rows():
    rng = np.random.default_rng(0)
    state = {"roi_heads.box_predictor.cls_score.weight": rng.normal(size=(91, 6)),
             "roi_heads.box_predictor.cls_score.bias": np.arange(91.0),
             "roi_heads.box_predictor.bbox_pred.weight": rng.normal(size=(364, 6)),
             "roi_heads.box_predictor.bbox_pred.bias": np.arange(364.0),
             "backbone.body.conv1.weight": np.ones((2, 2))}
    rows = parse_classes("coco80", 91)
    assert len(rows) == 81 and rows[:13] == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13) and rows[-1] == 90
    assert rows == COCO80_ROWS
    out = select_classes(state, rows)
    np.testing.assert_array_equal(out["roi_heads.box_predictor.cls_score.bias"], np.asarray(rows, float))
    np.testing.assert_array_equal(out["roi_heads.box_predictor.cls_score.weight"][12], state[
        "roi_heads.box_predictor.cls_score.weight"][13])  # contiguous 12 = stop sign = COCO id 13
    np.testing.assert_array_equal(out["roi_heads.box_predictor.bbox_pred.bias"][48:52], [52, 53, 54, 55])
    assert out["backbone.body.conv1.weight"] is state["backbone.body.conv1.weight"]
    assert parse_classes("0,3,1", 5) == (0, 3, 1)
    for bad in ("3,1", "0,1,1", "0,9", "0,x"):
        with pytest.raises(ConversionError):
            parse_classes(bad, 5)
    with pytest.raises(ConversionError, match="91-slot"):
        parse_classes("coco80", 11)


@pytest.mark.slow
def test_converted_fasterrcnn_detects_like_torchvision(r50_pth):
    """The converted box detector (mask branch at its initialisation) gives torchvision's boxes."""
    ref = copy.deepcopy(r50_pth[1])  # calibrated below; the fixture's model stays as saved
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, size=(14, 18, 3))
    image = np.clip(np.kron(base, np.ones((16, 16, 1)))[:224, :288] + rng.normal(0, 20, (224, 288, 3)), 0, 255)
    image = image.astype(np.uint8)
    t_image = [torch.from_numpy(image).permute(2, 0, 1).float() / 255.0]
    ref.transform.min_size, ref.transform.max_size = (224,), 288
    calibrate_maskrcnn_(ref, t_image)
    flat, cfg, lacking = from_torch.convert_fasterrcnn(
        {k: v.numpy() for k, v in ref.state_dict().items()}, depth=50)
    assert sorted(lacking) == sorted(MASK_KEYS)
    model = MaskRCNN(cfg, rngs=nnx.Rngs(0))
    variables = flat_variables(model)
    for path, value in flat.items():
        variables[path][...] = jnp.asarray(value)
    with torch.no_grad():
        expected = ref(t_image)[0]
    batch = preprocess([image], min_size=224, max_size=288)
    det = jax.device_get(make_predict_fn(model)(batch.images, batch.image_sizes))
    v = det.valid[0]
    boxes = resize_boxes(det.boxes, batch.image_sizes, batch.original_sizes)[0][v]
    assert len(expected["boxes"]) >= 20 and len(boxes) == len(expected["boxes"])
    np.testing.assert_array_equal(det.labels[0][v], expected["labels"].numpy())
    np.testing.assert_allclose(det.scores[0][v], expected["scores"].numpy(), atol=1e-3)
    np.testing.assert_allclose(boxes, expected["boxes"].numpy(), atol=0.05)


# --------------------------------------------------------------------------- train.freeze


def test_freeze_groups_split_the_real_model():
    from tests.model_utils import tiny_config

    model = nnx.eval_shape(lambda: MaskRCNN(tiny_config(), rngs=nnx.Rngs(0)))
    _, params, rest = nnx.split(model, optim.trainable_filter("detector"), ...)
    trainable = {_name(p) for p, _ in nnx.to_flat_state(params)}
    assert trainable and all(n.startswith(MASK_BRANCH) for n in trainable), sorted(trainable)
    assert any(n.startswith("roi_heads.weight_transfer.") for n in trainable)
    assert any(n.startswith("roi_heads.mask_predictor.mask_mlp.") for n in trainable)
    frozen = {_name(p) for p, _ in nnx.to_flat_state(rest)}
    assert not any(n.startswith(MASK_BRANCH) for n in frozen)
    assert optim.parse_freeze("box_head, detector") == ("backbone", "box_head", "rpn")
    _, params, _ = nnx.split(model, optim.trainable_filter("backbone"), ...)
    assert not any(_name(p).startswith("backbone.") for p, _ in nnx.to_flat_state(params))
    assert any(_name(p).startswith("rpn.") for p, _ in nnx.to_flat_state(params))


@pytest.mark.parametrize("freeze, init, message", [
    ("detector,heads", "ckpt", "train.freeze: unknown part 'heads'; use a comma-separated list of backbone, rpn, "
                               "box_head, mask_head or the preset 'detector'"),
    ("detector", "", "train.freeze='detector' keeps backbone, box_head, rpn at their initial values: set "
                     "train.init_checkpoint"),
    ("detector,mask_head", "ckpt", "train.freeze freezes every part of the model: nothing would train"),
])
def test_freeze_config_errors(freeze, init, message):
    c = F.tiny_config("unused", freeze=freeze, init_checkpoint=init)
    with pytest.raises(ValueError) as err:
        config_lib.validate(c)
    assert message in str(err.value)
    assert len(str(err.value).splitlines()) == 2  # "invalid config:" + this one problem


def _stagewise_config(data_dir: str, ckpt: str, freeze: str = "detector", **train):
    """The tiny training config with a torchvision-sized detector (FPN 256, box head 1024) to load."""
    c = F.tiny_config(data_dir, init_checkpoint=ckpt, freeze=freeze, batch_size=2, **train)
    m = c.model
    m.norm, m.freeze_at = "frozen_bn", 2  # torchvision's resnet_fpn_backbone
    m.fpn_channels, m.representation = 256, 1024
    m.mask_head_channels = m.transfer_hidden = 8
    m.mlp_fusion = True  # 8*28*28 -> 28*28: trained here too
    c.train.weight_decay = 1e-2  # large, so decay on a frozen variable could not hide
    config_lib.validate(c)
    return c


@pytest.fixture(scope="module")
def stagewise(tmp_path_factory):
    """A converted R-18 Faster R-CNN with the synthetic class count, the data and one Trainer."""
    root = tmp_path_factory.mktemp("stagewise")
    pth = root / "fasterrcnn_r18.pth"
    torch.save(_r18_fasterrcnn(SYNTHETIC_CLASSES).state_dict(), pth)
    ckpt = root / "fasterrcnn_r18"
    assert from_torch.main(["--arch", "fasterrcnn_resnet18_fpn", "--checkpoint", str(pth), "--output", str(ckpt)]) == 0
    cfg = _stagewise_config(str(root / "data"), str(ckpt), steps=4)
    info = train_lib.load_datasets(cfg)
    assert info.num_classes == SYNTHETIC_CLASSES
    trainer = train_lib.Trainer(cfg, info.num_classes)
    return root, str(ckpt), info, trainer


def _train(stagewise, workdir, steps, **train):
    root, ckpt, info, trainer = stagewise
    cfg = _stagewise_config(str(root / "data"), ckpt, steps=steps, **train)
    return train_lib.train(cfg, str(workdir), trainer=trainer, info=info, evaluate_at_end=False, progress=False)


def test_stagewise_training_freezes_the_detector(stagewise, tmp_path):
    root, ckpt, info, trainer = stagewise
    init = jax.device_get(trainer.init_state())
    res = _train(stagewise, tmp_path / "run", 2)
    state = jax.device_get(res.state)

    report = json.load(open(tmp_path / "run" / train_lib.INIT_REPORT_FILE))
    assert report["kind"] == "box_detector" and not report["frozen_not_loaded"] and not report["unused"]
    assert report["not_loaded"] and all(n.startswith(MASK_BRANCH) for n in report["not_loaded"])

    # Only the mask branch is trainable: tau, mask head, conv5_mask, MLP fusion.
    trained = {_name(p): np.asarray(v) for p, v in nnx.to_flat_state(state.params)}
    assert set(trained) == set(report["not_loaded"])
    before = {_name(p): np.asarray(v) for p, v in nnx.to_flat_state(init.params)}
    assert all(not np.array_equal(before[n], trained[n]) for n in trained), \
        [n for n in trained if np.array_equal(before[n], trained[n])]

    # Every frozen variable (detector parameters and FrozenBN buffers) is bitwise the converted value.
    converted = {_name(p): a for p, a in load_flat(ckpt).items()}
    frozen = {_name(p): np.asarray(v) for p, v in nnx.to_flat_state(state.rest)}
    assert set(frozen) == set(converted)
    assert all(np.array_equal(frozen[n], converted[n]) for n in frozen)

    # The optimiser holds nothing for the frozen parts: its arrays are the momentum of each trained param.
    opt_leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
    opt_paths = [jax.tree_util.keystr(p) for p, _ in opt_leaves]
    assert not any(s in p for p in opt_paths for s in ("backbone", "'rpn'", "box_head", "box_predictor"))
    big = [x for _, x in opt_leaves if np.ndim(x) > 0]
    assert len(big) == len(trained) and sum(x.size for x in big) == sum(x.size for x in trained.values())

    # The class count is read back from the saved state, where the frozen box predictor sits in ``rest``.
    from maskx_jax.workdir import load_variables

    assert load_variables(str(tmp_path / "run" / "checkpoints" / "2"))[1]["num_classes"] == SYNTHETIC_CLASSES


def test_stagewise_resume_is_bitwise_and_freeze_changes_are_refused(stagewise, tmp_path):
    straight = _train(stagewise, tmp_path / "straight", 4)
    _train(stagewise, tmp_path / "split", 2)
    resumed = _train(stagewise, tmp_path / "split", 4)
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["2", "4"]
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.state)), jax.tree.leaves(jax.device_get(resumed.state))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    root, ckpt, info, _ = stagewise
    cfg = _stagewise_config(str(root / "data"), ckpt, steps=6, freeze="backbone")
    with pytest.raises(train_lib.ConfigMismatchError, match="train.freeze: 'detector' \\(saved\\) -> 'backbone'"):
        train_lib.train(cfg, str(tmp_path / "split"), info=info, evaluate_at_end=False, progress=False)


def test_wrong_class_count_is_refused_when_frozen(stagewise, tmp_path):
    """A detector whose class-sized layers do not fit would leave a frozen random box predictor."""
    pth, ckpt = tmp_path / "five.pth", tmp_path / "five"
    torch.save(_r18_fasterrcnn(5).state_dict(), pth)
    assert from_torch.main(["--arch", "fasterrcnn_resnet18_fpn", "--checkpoint", str(pth), "--output", str(ckpt)]) == 0
    root, _, info, trainer = stagewise
    cfg = _stagewise_config(str(root / "data"), str(ckpt), steps=2)
    with pytest.raises(train_lib.InitCheckpointError) as err:
        train_lib.train(cfg, str(tmp_path / "run"), trainer=trainer, info=info, evaluate_at_end=False,
                        progress=False)
    msg = str(err.value)
    assert "roi_heads.box_predictor.cls_score.kernel" in msg and "--classes coco80" in msg
    assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(tmp_path / "run" / "checkpoints")


def test_frozen_detector_gets_no_backward_pass(stagewise):
    """Differentiating only the trainable subset: the compiled step does far fewer FLOPs than
    training everything (no backward through backbone, RPN or box head)."""
    root, ckpt, info, trainer = stagewise
    batch = trainer.global_batch(F.real_batch(0, 0, 2))

    def flops(t):
        cost = t.train_step.lower(t.abstract_state(), batch).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    full = train_lib.Trainer(_stagewise_config(str(root / "data"), ckpt, freeze=""), info.num_classes)
    assert flops(trainer) < 0.6 * flops(full)
