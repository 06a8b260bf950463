"""data.box_source=tfds: boxes from a prepared tfds coco-shaped dataset (read for real, see
test_data_tfds.py), masks from the synthetic data; tfds's class names mapped by a class map file."""
import json

import numpy as np
import pytest

import resources

resources.import_or_skip("tensorflow_datasets", "tfds")

import train_fixtures as F
from maskx_jax import config as config_lib
from maskx_jax.data import pipeline
from maskx_jax.data.synthetic_shapes import CLASS_NAMES
from tests.unit.test_data_tfds import data_dir  # noqa: F401  (the prepared tfds dataset fixture)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_tfds_box_source(tmp_path, data_dir):  # noqa: F811 - data_dir is the imported fixture
    c = F.tiny_config(str(tmp_path))
    d = c.data
    d.box_source, d.tfds_data_dir, d.box_source_fraction = "tfds", data_dir, 0.5
    config_lib.validate(c)
    with pytest.raises(ValueError, match=r"\['person', 'bicycle', 'car'\] match no class of data.source"):
        pipeline.load_datasets(c)
    (tmp_path / "map.json").write_text(json.dumps({"person": "disk", "car": "square", "bicycle": "cycle"}))
    d.box_source_class_map = str(tmp_path / "map.json")
    d.box_source_unmatched = "add"
    info = pipeline.load_datasets(c)
    assert info.class_names == ("__background__",) + CLASS_NAMES + ("cycle",)
    assert info.train.parts[1].lut.tolist() == [0, 1, 11, 2]
    assert info.train_sizes == (16, 5) and info.unscored_ids == (11,)
    with pipeline.make_train_iterator(c, info=info) as it:
        for step in range(3):
            batch = next(it)
            rows = info.train_indices(c.train.seed, step, c.train.batch_size) >= info.train_sizes[0]
            assert rows.sum() == c.train.batch_size // 2
            assert not batch.gt_has_mask[rows].any() and batch.gt_has_mask[~rows].any()
            assert set(np.unique(batch.gt_classes[rows][batch.gt_valid[rows]])) <= {1, 2, 11}
