"""Shared by the train_lib / sharding tests: a tiny stand-in detector, synthetic batches, tiny configs.

The stand-in exposes the real detector's interface (``losses(batch, rng)``, ``predict(images,
image_sizes)``), has both trainable ``nnx.Param`` and frozen ``FrozenStat`` variables, and uses
its RNG, so the train-loop machinery (sharding, checkpoints, resumption, non-finite handling) is
tested in seconds; the same tests also run the real detector at toy size (:func:`tiny_config`).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskx_jax import config as config_lib
from maskx_jax.layers import FrozenStat
from maskx_jax.types import Batch, Detections

NUM_CLASSES = 5
IMAGE = 32
SLOTS = 3


@jax.custom_vjp
def _poison_gradient(x: jax.Array, poison: jax.Array) -> jax.Array:
    """Identity; its gradient is infinite where ``poison`` (a scalar bool) is set: a finite loss whose
    gradient is not, which the train step must catch through the gradient norm alone."""
    return x


def _poison_fwd(x, poison):
    return x, poison


def _poison_bwd(poison, g):
    return jnp.where(poison, jnp.inf, 1.0) * g, None


_poison_gradient.defvjp(_poison_fwd, _poison_bwd)


class TinyDetector(nnx.Module):
    """conv -> global pool -> (class logits, box) for the first gt slot; a frozen per-channel scale."""

    def __init__(self, num_classes: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.scale = FrozenStat(jnp.linspace(0.5, 1.5, 8, dtype=jnp.float32))
        self.cls = nnx.Linear(8, num_classes, rngs=rngs)
        self.box = nnx.Linear(8, 4, rngs=rngs)
        self.num_classes = num_classes

    def _features(self, images):
        x = jax.nn.relu(self.conv(images))
        return x.mean(axis=(1, 2)) * self.scale[...]

    def losses(self, batch: Batch, rng: jax.Array):
        # a batch whose mask crops are negative (synthetic_batch(bad_gradient=True)) poisons the gradient only
        feats = _poison_gradient(self._features(batch.images), jnp.any(batch.gt_masks < 0))
        keep = jax.random.bernoulli(rng, 0.8, feats.shape)  # uses the step RNG, like RoI sampling
        feats = jnp.where(keep, feats / 0.8, 0.0)
        logits = self.cls(feats)
        labels = batch.gt_classes[:, 0]
        cls_loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
        target = batch.gt_boxes[:, 0] / IMAGE
        box_loss = jnp.mean(jnp.abs(self.box(feats) - target))
        return cls_loss + box_loss, {"loss_classifier": cls_loss, "loss_box_reg": box_loss}

    def predict(self, images, image_sizes) -> Detections:
        feats = self._features(images)
        probs = jax.nn.softmax(self.cls(feats))
        n = images.shape[0]
        return Detections(boxes=(self.box(feats) * IMAGE)[:, None], scores=probs.max(-1)[:, None],
                          labels=probs.argmax(-1)[:, None].astype(jnp.int32), valid=jnp.ones((n, 1), bool),
                          masks=jnp.zeros((n, 1, 28, 28), jnp.float32))


def tiny_model_fn(config, num_classes, seed):
    return TinyDetector(num_classes, rngs=nnx.Rngs(seed))


def synthetic_batch(seed: int, step: int, batch_size: int, nan: bool = False, bad_gradient: bool = False) -> Batch:
    """The global batch of ``step``: a pure function of (seed, step). ``nan``: NaN pixels and boxes (a NaN loss);
    ``bad_gradient``: a finite loss whose gradient is infinite (see :func:`_poison_gradient`)."""
    r = np.random.default_rng([seed, step])
    b = batch_size
    xy = r.uniform(0, IMAGE / 2, (b, SLOTS, 2))
    wh = r.uniform(4, IMAGE / 2, (b, SLOTS, 2))
    images = r.normal(size=(b, IMAGE, IMAGE, 3)).astype(np.float32)
    boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
    if nan:  # a corrupt record: NaN pixels and boxes
        images[:] = np.nan
        boxes[:] = np.nan
    return Batch(
        images=images,
        image_sizes=np.full((b, 2), IMAGE, np.int32),
        gt_boxes=boxes,
        gt_classes=r.integers(1, NUM_CLASSES, (b, SLOTS)).astype(np.int32),
        gt_valid=np.ones((b, SLOTS), bool),
        gt_crowd=np.zeros((b, SLOTS), bool),
        gt_has_mask=np.ones((b, SLOTS), bool),
        gt_masks=np.full((b, SLOTS, 8, 8), -1.0 if bad_gradient else 1.0, np.float32),
        image_ids=np.arange(b, dtype=np.int32) + step * b,
        original_sizes=np.full((b, 2), IMAGE, np.int32),
    )


def make_synthetic_iter(nan_steps=(), bad_gradient_steps=()):
    """A ``make_train_iterator`` stand-in; the steps in ``nan_steps`` get NaN images, those in
    ``bad_gradient_steps`` a finite loss with an infinite gradient."""

    def it(config, *, start_step=0, process_index=0, process_count=1):
        b = config.train.batch_size
        local = b // process_count
        step = start_step
        while True:
            g = synthetic_batch(config.data.synthetic_seed, step, b, nan=step in nan_steps,
                                bad_gradient=step in bad_gradient_steps)
            yield jax.tree.map(lambda x: x[process_index * local:(process_index + 1) * local], g)
            step += 1

    return it


def stand_in_config(**train):
    """Config for the stand-in model: tiny schedule, every step logged."""
    c = config_lib.base_config()
    c.train.batch_size = 8
    c.train.steps = 6
    c.train.lr = 0.1
    c.train.warmup_steps = 2
    c.train.lr_steps = (4,)
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.train.keep_checkpoints = 5
    c.data.set_a = "all"
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def tiny_config(data_dir: str, **train):
    """The real model at toy size: ResNet-18, 64x64 images, few anchors' top-n and RoIs."""
    c = stand_in_config(**dict(dict(lr=0.02), **train))
    m, d = c.model, c.data
    m.depth = 18
    m.fpn_channels = 32
    m.representation = 64
    m.mask_head_channels = 32
    m.transfer_hidden = 32
    m.rpn_pre_nms_top_n_train = 64
    m.rpn_post_nms_top_n_train = 32
    m.rpn_pre_nms_top_n_test = 64
    m.rpn_post_nms_top_n_test = 32
    m.rpn_batch_size_per_image = 32
    m.roi_batch_size_per_image = 16
    m.max_mask_rois_per_image = 8
    m.detections_per_img = 10
    m.mlp_fusion = False  # its 25088 x 784 FC would dominate the toy model's size
    m.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))
    d.set_a = "disk,square,triangle,star,cross,ellipse"  # the synthetic classes in set A; the rest are set B
    d.source = "synthetic"
    d.synthetic_dir = os.path.join(data_dir, "synthetic")
    d.cache_dir = os.path.join(data_dir, "cache")
    d.synthetic_image_size = 64
    d.synthetic_num_train = 16
    d.synthetic_num_val = 8
    d.min_size = 64
    d.max_size = 64
    d.pad_height = 64
    d.pad_width = 64
    d.max_instances = 4
    d.mask_crop_size = 14
    d.num_workers = 0  # in-process; worker processes: test_data_workers, test_crash_resume, test_sharding
    d.prefetch = 1
    c.eval.batch_size = 8
    c.eval.max_images = 8
    c.eval.num_pictures = 0
    return c


# --------------------------------------------------------------------------- subprocess worker


def real_model_config(**train):
    """The real detector at toy size for batches from :func:`real_batch` (no data pipeline needed)."""
    return tiny_config("unused", **train)


def real_batch(seed: int, step: int, batch_size: int) -> Batch:
    """A global batch for the real model at step ``step`` (64x64 images, 4 slots, disk masks)."""
    from model_utils import synthetic_batch as model_batch

    return model_batch(seed=seed * 100003 + step, n=batch_size, size=64, g=4, num_classes=NUM_CLASSES, crop=14)


def _worker(argv):
    """``python tests/train_fixtures.py {stand_in|real} OUT.npz STEPS``: run STEPS train steps on every
    visible device and save the per-step losses and the final parameters (see test_sharding.py)."""
    import sys
    import time

    kind, out, steps = argv[1], argv[2], int(argv[3])
    jax.config.update("jax_default_matmul_precision", "highest")
    from maskx_jax import train_lib

    # No warmup, so the very first step moves the parameters by a full lr * gradient.
    if kind == "real":
        cfg = real_model_config(warmup_steps=0)
        cfg.model.mask_chunk_slots = 2  # the mask chunk loop, its count of chunks a max over the sharded batch
        # Mask^X with MLP fusion, its FC (16*28*28 x 784) split over the devices with its momentum
        # (train.shard_params), everything else replicated
        cfg.model.mlp_fusion = True
        cfg.model.mask_head_channels = cfg.model.transfer_hidden = 16
        cfg.train.shard_params = "mask_mlp"
        trainer = train_lib.Trainer(cfg, NUM_CLASSES)
        batch_fn = real_batch
    else:
        cfg = stand_in_config(warmup_steps=0)
        trainer = train_lib.Trainer(cfg, NUM_CLASSES, model_fn=tiny_model_fn)
        batch_fn = synthetic_batch
    state = trainer.init_state()
    sharded = sorted(jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
                     if not x.sharding.is_fully_replicated)
    init = {"init/" + jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
    totals, times = [], []
    losses = {}
    for step in range(steps):
        t0 = time.perf_counter()
        state, m = trainer.train_step(state, trainer.global_batch(batch_fn(0, step, cfg.train.batch_size)))
        m = jax.device_get(m)
        times.append(time.perf_counter() - t0)
        totals.append(m["total"])
        for k, v in m["losses"].items():
            losses.setdefault(k, []).append(v)
        assert not m["nonfinite"], m
    params = {"param/" + jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
    np.savez(out, total=np.asarray(totals), times=np.asarray(times), devices=jax.device_count(),
             sharded=np.asarray(sharded, dtype=str),
             **{"loss/" + k: np.asarray(v) for k, v in losses.items()}, **params, **init)
    print(f"{kind}: {jax.device_count()} devices, step times {np.round(times, 3).tolist()} s", file=sys.stderr)


if __name__ == "__main__":
    import sys

    from maskx_jax.backends.cpu import xla_flags

    xla_flags.apply_cpu_defaults()  # as the entry points do
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
    _worker(sys.argv)


def iter_events(path: str):
    """Every ``Event`` proto in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 12 + n + 4
