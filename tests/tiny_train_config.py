"""``train.py --config tests/tiny_train_config.py``: the real detector at toy size (tests only).

ResNet-18-FPN with GroupNorm, 64x64 synthetic images, few anchors/RoIs: a step takes well under a
second on CPU. The data folders default to ``runs/tiny_synthetic``; tests point them elsewhere with
``--config.data.synthetic_dir=... --config.data.cache_dir=...``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_fixtures as F


def get_config():
    c = F.tiny_config("runs/tiny_synthetic")
    c.model.norm = "group_norm"
    c.model.freeze_at = 0
    c.train.batch_size = 2
    c.train.log_every = 1
    return c
