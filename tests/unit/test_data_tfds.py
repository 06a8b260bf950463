"""tfds as a box-only source, read for real: a tiny coco-shaped dataset is prepared on disk
(ArrayRecord, no TensorFlow needed) and read back through TfdsSource and the pipeline."""
import io
import os

import numpy as np
import pytest

import resources

tfds = resources.import_or_skip("tensorflow_datasets", "tfds")

from PIL import Image

from maskx_jax.config import base_config
from maskx_jax.data import pipeline
from maskx_jax.data.tfds_source import TfdsSource, resolve_builder_dir

# pycocotools calls numpy.asarray(copy=False) internally (numpy 2 deprecation): not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NAMES = ["person", "bicycle", "car"]


def _jpeg(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _examples(split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 5 if split == "train" else 3
    for i in range(n):
        h, w = 40 + 8 * i, 60
        image = _jpeg(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        if split == "train" and i == 1:
            image = image[: len(image) // 4]  # truncated JPEG bytes
        if split == "train" and i == 2:
            image = _jpeg(rng.integers(0, 255, (h, w), dtype=np.uint8))  # grayscale JPEG
        objects = [
            {"id": 10 * i + 1, "area": 100, "bbox": tfds.features.BBox(0.1, 0.2, 0.5, 0.6), "label": "car",
             "is_crowd": False},
            {"id": 10 * i + 2, "area": 50, "bbox": tfds.features.BBox(0.0, 0.5, 1.0, 1.0), "label": "person",
             "is_crowd": i == 3},
        ]
        if i == 4:
            objects.append({"id": 99, "area": 0, "bbox": tfds.features.BBox(0.3, 0.3, 0.3, 0.5), "label": "bicycle",
                            "is_crowd": False})  # zero height
        yield f"{split}{i}", {"image": image, "image/filename": f"{split}_{i}.jpg",
                              "image/id": 1000 * (split == "val") + i, "objects": objects}


class Coco(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Same features as tfds `coco/2017` (minus 77 classes), written as ArrayRecord."""

    name = "coco"
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=NAMES), "is_crowd": np.bool_,
            }),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "validation": self._generate_examples("val")}

    def _generate_examples(self, split):
        yield from _examples(split)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    Coco(data_dir=str(root), file_format="array_record").download_and_prepare()
    return str(root)


def test_reads_boxes_labels_crowd_without_masks(data_dir):
    assert resolve_builder_dir(data_dir, "coco/2017").endswith(os.path.join("coco", "2017", "1.1.0"))
    src = TfdsSource(data_dir, "coco/2017", "train")
    assert src.class_names == ("__background__", "person", "bicycle", "car")
    assert src.contiguous_to_cat_id == {1: 1, 2: 2, 3: 3}  # COCO's ids for these names
    assert len(src) == 5
    by_id = {}
    for i in range(len(src)):
        ex = src.load(i)
        if ex is not None:
            by_id[ex.image_id] = ex
    assert sorted(by_id) == [0, 2, 3, 4]  # 1 is truncated
    ex = by_id[0]
    assert ex.masks is None and not ex.has_segm.any()
    assert ex.image.shape == (40, 60, 3)
    # Normalised [ymin, xmin, ymax, xmax] -> absolute XYXY.
    np.testing.assert_allclose(ex.boxes, [[12, 4, 36, 20], [30, 0, 60, 40]], atol=1e-4)
    assert ex.classes.tolist() == [3, 1]
    assert by_id[3].crowd.tolist() == [False, True]
    assert len(by_id[4].boxes) == 2  # the zero-height box was skipped
    assert src.issues.summary() == {"image_unreadable": 1, "image_grayscale": 1, "box_degenerate": 1}


def test_pipeline_box_only_batches_and_val_json(data_dir, tmp_path):
    c = base_config()
    c.unlock()
    d = c.data
    d.source, d.tfds_data_dir, d.cache_dir = "tfds", data_dir, str(tmp_path)
    d.min_size, d.max_size, d.pad_height, d.pad_width, d.max_instances, d.mask_crop_size = 64, 96, 96, 96, 4, 8
    c.train.batch_size = 4
    c.eval.batch_size = 2
    info = pipeline.load_datasets(c)
    assert info.num_classes == 4 and info.set_a_ids == (1, 2, 3) and not info.val_has_masks
    with pipeline.make_train_iterator(c, info=info) as it:
        batches = [next(it) for _ in range(3)]
    for b in batches:
        assert b.gt_valid.any()
        assert not b.gt_has_mask.any() and (b.gt_masks == 0).all()  # tfds coco has no masks
        assert 1 not in b.image_ids.tolist()  # the unreadable image was replaced
    evals = list(pipeline.make_eval_batches(c, info=info))
    ids = [r.image_id for _, recs in evals for r in recs]
    assert ids == [info.val.record(i).image_id for i in range(3)]  # tfds's stored order
    assert sorted(ids) == [1000, 1001, 1002]
    assert evals[-1][0].image_ids.tolist() == [ids[-1], -1]
    from pycocotools.coco import COCO
    coco = COCO(info.val_json)
    assert sorted(coco.getImgIds()) == [1000, 1001, 1002] and len(coco.getAnnIds()) == 6


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TfdsSource(str(tmp_path), "coco/2017", "train")
