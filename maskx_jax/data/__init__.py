"""Data: COCO / tfds / synthetic sources and static-shape batches (see pipeline.py)."""
from maskx_jax.data.classes import COCO_CATEGORIES, VOC_CLASSES, parse_set_a
from maskx_jax.data.coco import CocoSource
from maskx_jax.data.issues import Issues
from maskx_jax.data.pipeline import (
    DatasetInfo,
    TrainIterator,
    load_datasets,
    make_eval_batches,
    make_train_iterator,
)
from maskx_jax.data.records import Example, ImageRecord, Instance
from maskx_jax.data.synthetic import SyntheticPaths, generate_synthetic

__all__ = [
    "COCO_CATEGORIES", "VOC_CLASSES", "parse_set_a", "CocoSource", "Issues", "DatasetInfo", "TrainIterator",
    "load_datasets", "make_eval_batches", "make_train_iterator", "Example", "ImageRecord", "Instance",
    "SyntheticPaths", "generate_synthetic",
]
