"""torch <-> flax checkpoint conversion: round trips, legacy names, refusals, safe loading."""
from __future__ import annotations

import os
import pickle

import jax
import numpy as np
import pytest
import torch
import torchvision

from convert import from_torch, to_torch
from convert.mapping import ConversionError, canonical_torch_key, torchvision_key
from convert.torch_io import CheckpointReadError, load_state_dict
from maskx_jax.checkpoint import load_detector, read_meta
from tests.torch_utils import nchw, randomize_batchnorm_

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def maskrcnn_pth(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                               num_classes=NUM_CLASSES)
    randomize_batchnorm_(model)
    path = tmp_path_factory.mktemp("ckpt") / "maskrcnn.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_round_trip_is_bitwise_identical(maskrcnn_pth, tmp_path):
    src, ref_state = maskrcnn_pth
    out_dir, back = tmp_path / "flax", tmp_path / "back.pth"
    assert from_torch.main(["--arch", "maskrcnn_resnet50_fpn", "--checkpoint", str(src), "--output", str(out_dir)]) == 0
    assert read_meta(str(out_dir))["config"]["num_classes"] == NUM_CLASSES
    assert to_torch.main(["--checkpoint", str(out_dir), "--output", str(back)]) == 0  # verifies strict=True load
    got = torch.load(back, weights_only=True)
    assert set(got) == set(ref_state)
    for k, v in ref_state.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), f"{k} differs after the round trip"
    # and it loads into torchvision strictly
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                               num_classes=NUM_CLASSES)
    model.load_state_dict(got, strict=True)


def test_legacy_key_names_are_accepted(maskrcnn_pth):
    _, state = maskrcnn_pth
    legacy = {}
    for k, v in state.items():
        legacy[canonical_torch_key(k)] = v.numpy()  # our canonical names are torchvision's legacy names
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn1.weight" in legacy
    assert "backbone.fpn.inner_blocks.0.weight" in legacy
    current = from_torch.convert_maskrcnn({k: v.numpy() for k, v in state.items()})
    old = from_torch.convert_maskrcnn(legacy)
    a, b = jax.tree.leaves(current), jax.tree.leaves(old)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_key_name_tables_are_inverse():
    for k in ["backbone.fpn.layer_blocks.2.0.bias", "rpn.head.conv.0.0.weight", "roi_heads.mask_head.3.0.weight",
              "backbone.body.layer3.5.bn2.running_var"]:
        assert torchvision_key(canonical_torch_key(k)) == k


def test_refuses_partial_checkpoint_and_names_problems(maskrcnn_pth, tmp_path):
    _, state = maskrcnn_pth
    bad = {k: v.clone() for k, v in state.items()}
    del bad["rpn.head.cls_logits.weight"]
    bad["roi_heads.extra.weight"] = torch.zeros(3)
    bad["backbone.fpn.layer_blocks.0.0.weight"] = torch.zeros(256, 256, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(ConversionError) as err:
        from_torch.convert_maskrcnn(load_state_dict(str(path)))
    msg = str(err.value)
    assert "rpn.head.cls_logits.weight" in msg
    assert "roi_heads.extra.weight" in msg
    assert "backbone.fpn.layer_blocks.0.0.weight" in msg and "(256, 256, 1, 1)" in msg
    out = tmp_path / "out"
    assert from_torch.main(["--arch", "maskrcnn_resnet50_fpn", "--checkpoint", str(path), "--output", str(out)]) == 1
    assert not out.exists(), "a refused conversion must not write anything"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_wrong_architecture_gets_a_hint(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ConversionError, match="ResNet classification checkpoint"):
        from_torch.convert_maskrcnn(load_state_dict(str(path)))


def test_resnet_classification_checkpoint_to_backbone(tmp_path):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None).eval()
    randomize_batchnorm_(ref, seed=3)
    path = tmp_path / "resnet18.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    out = tmp_path / "r18"
    assert from_torch.main(["--arch", "resnet18", "--checkpoint", str(path), "--output", str(out)]) == 0
    assert read_meta(str(out))["kind"] == "resnet"
    body = from_torch.convert_resnet(load_state_dict(str(path)), 18)
    x = np.random.default_rng(0).normal(size=(1, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        t = nchw(x)
        t = ref.maxpool(ref.relu(ref.bn1(ref.conv1(t))))
        t = ref.layer4(ref.layer3(ref.layer2(ref.layer1(t))))
    got = np.asarray(body(x)[-1])
    want = t.numpy().transpose(0, 2, 3, 1)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # and back: loads into torchvision's resnet18 (all but the classifier)
    assert to_torch.main(["--checkpoint", str(out), "--output", str(tmp_path / "r18_back.pth")]) == 0


class _Payload:
    """Unpickling this runs code: the loader must refuse before that happens."""

    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"backbone.body.conv1.weight": _Payload()}, f)
    with pytest.raises(CheckpointReadError, match="refused"):
        load_state_dict(str(path))
    assert not marker.exists(), "the pickle payload ran"
    assert from_torch.main(["--arch", "resnet18", "--checkpoint", str(path), "--output", str(tmp_path / "o")]) == 1
    assert not marker.exists()
    assert not (tmp_path / "o").exists()  # nothing written: not even the output folder
    assert sorted(os.listdir(tmp_path)) == ["evil.pth"]  # no half-written or temporary sibling either


def test_loaded_checkpoint_predicts_like_converted(maskrcnn_pth, tmp_path):
    """The orbax checkpoint the converter writes loads back into an identical model."""
    src, _ = maskrcnn_pth
    out_dir = tmp_path / "flax"
    assert from_torch.main(["--arch", "maskrcnn_resnet50_fpn", "--checkpoint", str(src), "--output", str(out_dir)]) == 0
    loaded = load_detector(str(out_dir))
    direct = from_torch.convert_maskrcnn(load_state_dict(str(src)))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(direct)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
