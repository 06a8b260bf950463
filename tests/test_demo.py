"""``make demo`` (``python -m maskx_jax.demo``) without its 15 minutes of training: the two runs it
starts, what it changes in their configs, and the results table it writes. Training itself is
stubbed; the demo config's real train.py path runs in test_readme_commands.py."""
from __future__ import annotations

import os
import sys
import types

from maskx_jax import demo, train_lib
from maskx_jax.train_lib import _flat_config, config_to_json_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(ap: float) -> dict:
    return {g: {"bbox": {"AP": ap, "AP50": 2 * ap}, "segm": {"AP": ap / 2, "AP50": ap}}
            for g in ("all", "set_a", "set_b")}


def test_demo_trains_both_mask_heads_alike_and_writes_the_table(tmp_path, monkeypatch, capsys):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # the demo imports configs.demo_synthetic*
    calls = []

    def fake_train(config, workdir, **kwargs):
        calls.append((config, workdir))
        return types.SimpleNamespace(metrics=_metrics(0.1 * len(calls)))

    monkeypatch.setattr(train_lib, "train", fake_train)
    assert demo.main(["--workdir", str(tmp_path), "--steps", "40"]) == 0

    (maskx, maskx_dir), (agnostic, agnostic_dir) = calls
    assert (maskx_dir, agnostic_dir) == (str(tmp_path / "maskx"), str(tmp_path / "agnostic"))
    assert maskx.model.mask_mode == "transfer" and agnostic.model.mask_mode == "class_agnostic"
    # Same data, set A and schedule: only the mask head differs between the two runs.
    a, b = _flat_config(config_to_json_dict(maskx)), _flat_config(config_to_json_dict(agnostic))
    assert {k for k in a if a[k] != b[k]} == {"model.mask_mode", "model.mlp_fusion"}
    assert maskx.train.steps == 40 and maskx.train.lr_steps == (30, 36) and maskx.train.checkpoint_every == 40
    assert maskx.data.synthetic_dir == str(tmp_path / "synthetic_data")

    table = open(tmp_path / "results.md").read()
    assert "| Mask^X R-CNN" in table and "| class-agnostic mask head (baseline)" in table
    # mask AP set B, mask AP50 set B, mask AP set A, box AP set B, box AP set A (in %)
    assert "| 5.0 | 10.0 | 5.0 | 10.0 | 10.0 |" in table and "| 10.0 | 20.0 | 10.0 | 20.0 | 20.0 |" in table
    assert table in capsys.readouterr().out
