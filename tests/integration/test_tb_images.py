"""TensorBoard prediction images during training (``eval.tb_images_every``, ``eval.tb_num_images``).

The loop machinery runs the stand-in detector (train_fixtures) on the tiny synthetic dataset's
validation images, so the whole path (fixed validation batch, predict on the mesh, drawing,
``add_image``) runs in seconds.
"""
from __future__ import annotations

import glob
import io
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import train_fixtures as F
from maskx_jax import train_lib

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools RLE decode on NumPy 2


class _StandIn(F.TinyDetector):
    """The stand-in with drawable boxes (corners ordered, inside the 64 px image), as a detector's are."""

    def predict(self, images, image_sizes):
        det = super().predict(images, image_sizes)
        b = jnp.clip(det.boxes, 0.0, 64.0)
        return det.replace(boxes=jnp.concatenate([jnp.minimum(b[..., :2], b[..., 2:]),
                                                  jnp.maximum(b[..., :2], b[..., 2:]) + 1.0], axis=-1))


def _model_fn(config, num_classes, seed):
    return _StandIn(num_classes, rngs=nnx.Rngs(seed))


def _read_images(path: str) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Image summaries {tag: [(step, uint8 HWC)]} from a TensorBoard event file (TFRecord framing)."""
    out: dict = {}
    for ev in F.iter_events(path):
        for v in ev.summary.value:
            if v.HasField("image"):
                img = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
                assert img.shape == (v.image.height, v.image.width, v.image.colorspace)
                out.setdefault(v.tag, []).append((ev.step, img))
    return out


def _config(tmp_path, **eval_keys):
    cfg = F.tiny_config(str(tmp_path / "data"), steps=4)
    cfg.eval.picture_score_thresh = 0.0  # the stand-in's scores are ~1/K: draw everything
    for k, v in eval_keys.items():
        setattr(cfg.eval, k, v)
    return cfg


def test_tb_images(tmp_path):
    cfg = _config(tmp_path, tb_images_every=2, tb_num_images=3)
    info = train_lib.load_datasets(cfg)
    trainer = train_lib.Trainer(cfg, info.num_classes, model_fn=_model_fn)
    result = train_lib.train(cfg, str(tmp_path / "run"), trainer=trainer, info=info,
                             train_iter_fn=F.make_synthetic_iter(), evaluate_at_end=False, progress=False)
    (events,) = glob.glob(str(tmp_path / "run" / "tb" / "events.out.tfevents.*"))
    images = _read_images(events)

    # the first 3 validation images, by image id, at steps 2 and 4
    from maskx_jax.data import pipeline

    batch, records = next(pipeline.make_eval_batches(cfg, "val", batch_size=3, max_images=3, info=info))
    assert sorted(images) == sorted(f"predictions/{int(r.image_id)}" for r in records)
    for tag, entries in images.items():
        assert [s for s, _ in entries] == [2, 4], tag
        for _, img in entries:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            assert min(img.shape[:2]) >= 384  # draw_detections upscales the 64 px images for legibility

    # step 4's pictures are the final weights' predictions drawn by the shared drawing code
    det = trainer.make_predict_fn(result.state)(batch.images, batch.image_sizes)
    drawn = train_lib.draw_predictions(det, batch, records, info, 0.0)
    bare = train_lib.draw_predictions(det, batch, records, info, 2.0)  # no detection passes
    assert len(drawn) == 3
    for (record, picture), (_, empty) in zip(drawn, bare):
        np.testing.assert_array_equal(images[f"predictions/{int(record.image_id)}"][-1][1], picture)
        assert not np.array_equal(picture, empty)  # boxes and labels are on it

    # write_pictures (end of run) draws with the same code
    cfg.eval.num_pictures = 3
    written = train_lib.write_pictures(cfg, str(tmp_path / "pictures"), trainer.make_predict_fn(result.state), info)
    assert [os.path.basename(p) for p in written] == [f"{int(r.image_id):012d}.png" for r in records]
    for path, (_, picture) in zip(written, drawn):
        assert np.asarray(Image.open(path)).shape == picture.shape


def test_tb_images_off_by_default(tmp_path):
    cfg = _config(tmp_path)
    assert cfg.eval.tb_images_every == 0 and cfg.eval.tb_num_images == 4
    info = train_lib.load_datasets(cfg)
    trainer = train_lib.Trainer(cfg, info.num_classes, model_fn=_model_fn)
    assert train_lib.make_tb_images_hook(cfg, trainer, info, None) is None
    cfg.train.steps = 2
    train_lib.train(cfg, str(tmp_path / "run"), trainer=trainer, info=info, train_iter_fn=F.make_synthetic_iter(),
                    evaluate_at_end=False, progress=False)
    (events,) = glob.glob(str(tmp_path / "run" / "tb" / "events.out.tfevents.*"))
    assert _read_images(events) == {}
