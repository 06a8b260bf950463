"""Configuration errors through ``train.py``: one clear message before anything compiles or is written.

Each case runs ``python train.py --config tests/tiny_train_config.py ...`` in a subprocess with
``JAX_LOG_COMPILES=1`` (JAX then logs every compilation) and checks: exit status 2, exactly one
error message naming the problem, no traceback, no compilation, no file in the work directory.
"""
from __future__ import annotations

import os

import pytest

import train_subprocess as TS

# (override, what the single message must say)
CASES = {
    "unknown_key": (["--config.train.stepz=5"],
                    "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    "unknown_section": (["--config.trian.steps=5"], "unknown config key 'trian.steps' (did you mean 'train.steps'?)"),
    "wrong_type_int": (["--config.train.steps=abc"],
                       "flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
    "wrong_type_float": (["--config.train.lr=fast"], "flag --config.train.lr=fast:"),
    "wrong_type_bool": (["--config.model.aligned=maybe"], "flag --config.model.aligned=maybe:"),
    "wrong_type_tuple": (["--config.model.anchor_sizes=abc"],
                         "model.anchor_sizes must be 5 non-empty tuples (P2..P6) of positive sizes"),
    "bad_buckets": (["--config.model.mask_slot_buckets=(16,-1)"],
                    "model.mask_slot_buckets must be a tuple of positive slot counts (or empty), got (16, -1)"),
    "bad_chunk": (["--config.model.mask_chunk_slots=-8"],
                  "model.mask_chunk_slots must be an int >= 0 (0 = all slots at once), got -8"),
    "bad_value": (["--config.model.depth=19"], "model.depth must be 18, 34, 50 or 101, got 19"),
    "transfer_without_set_a": (["--config.data.set_a="], "model.mask_mode=transfer needs a non-empty data.set_a"),
    "set_a_unknown_class": (["--config.data.set_a=disk,unicorn,square"],
                            "data.set_a names unknown class(es) ['unicorn']; valid names: ['disk', 'square'"),
    "set_a_preset_selects_nothing": (["--config.data.set_a=voc"],
                                     "data.set_a='voc' selects no class of this dataset"),
    "missing_annotation_file": (["--config.data.source=coco", "--config.data.train_json=/nonexistent/train.json",
                                 "--config.data.train_images=/nonexistent"],
                                "COCO annotation file not found: /nonexistent/train.json"),
    "unknown_on_nonfinite": (["--config.train.on_nonfinite=ignore"],
                            "train.on_nonfinite must be one of ('stop', 'skip'), got 'ignore'"),
    "unverified_shard_params": (["--config.train.shard_params=mask_mlp,cls_score"],
                                "train.shard_params: ['cls_score'] cannot be sharded; allowed: ('mask_mlp',)"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The synthetic dataset, generated once for all cases (the data-level checks read its classes)."""
    from maskx_jax.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data")
    generate_synthetic(str(root / "synthetic"), 16, 8, 64, 0)
    return str(root)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_error_is_one_message_before_any_compile(case, tmp_path, data_dir):
    overrides, message = CASES[case]
    workdir = tmp_path / "run"
    proc = TS.run(TS.command(str(workdir), *overrides, data_dir=data_dir), timeout=120, JAX_LOG_COMPILES="1")
    out = proc.stdout
    assert proc.returncode == 2, out[-3000:]
    assert message in out, out[-3000:]
    assert out.count("train.py: error:") == 1, out
    assert "Traceback" not in out and "Compiling" not in out, out[-3000:]
    assert not workdir.exists() or not os.listdir(workdir), sorted(os.listdir(workdir))
