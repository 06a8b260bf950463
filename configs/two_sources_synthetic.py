"""Two training sources, one vocabulary: masks from one dataset, boxes from another (the Mask^X setting).

Mask source (``data.source``): the built-in synthetic shapes, with the masks of ring, hexagon,
crescent and l_shape removed from the training annotations (those instances stay as boxes). Box
source (``data.box_source=synthetic``): a second built-in dataset generated with another seed
(``data.synthetic_seed + 1``, other images), used for boxes only: its instances never carry a mask.
Half of every batch comes from each (``data.box_source_fraction``). Classes are merged by name;
set A = the classes with masks in the mask source (``by_annotation``): disk, square, triangle, star,
cross, ellipse; set B = the rest.

For real data, point the box source at a box-only COCO JSON (or tfds ``coco/2017`` with the
``data.tfds_*`` keys) and map differing class names with a JSON file::

    --config.data.box_source=coco --config.data.box_source_json=boxes.json \\
    --config.data.box_source_images=boxes/ --config.data.box_source_class_map=names.json

    python train.py --config configs/two_sources_synthetic.py --workdir runs/two_sources
"""
from maskx_jax.configs.demo_synthetic import get_config as _demo


def get_config():
    c = _demo()
    d = c.data
    d.mask_supervision = "by_annotation"
    d.set_a = ""  # the mask source's classes with masks
    d.synthetic_mask_fraction = "ring:0,hexagon:0,crescent:0,l_shape:0"
    d.box_source = "synthetic"
    d.box_source_fraction = 0.5
    return c
