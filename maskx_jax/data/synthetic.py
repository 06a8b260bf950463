"""A synthetic instance-segmentation dataset, generated locally and deterministically.

Two variants (:data:`VARIANTS`, ``data.synthetic_variant``):

* ``shapes10`` (the default): ten shape classes (:data:`maskx_jax.data.synthetic_shapes.CLASS_NAMES`:
  disk, square, triangle, star, ring, cross, hexagon, crescent, ellipse, l_shape), 2-8 instances per
  image at 12-42 % of the image side.
* ``shapes24``: 24 classes (those ten and 14 with concavities, holes and thin parts), 2-6 instances at
  22-50 % of the side, and **camouflage**: three objects in four fade into the background across
  part of their extent (opacity ramps from 1 to 0-0.25 along a random direction, the last 7-33 % of
  the object's diameter nearly invisible). The masks and boxes are still the whole visible object, so
  the faded part can only be recovered from the class's shape: a mask head that knows the class
  (class-specific, or Mask^X's transferred weights) has something to gain over a class-agnostic one.
  Built to measure weight transfer (README, "Does Mask^X transfer?").

In both, each instance has a random rotation and mild aspect jitter (ellipses are elongated by
definition) and is painted with a random colour pair and texture (flat, stripes, checker, noise,
gradient) drawn independently of the class: the class is in the shape only. Backgrounds are
smooth colour fields mixed with a texture; distractor clutter (lines, dots, scribbles) is
drawn before the objects and is not annotated; Gaussian pixel noise goes on top.

Objects are painted in order, so later ones occlude earlier ones. A placement is rejected
(and redrawn) if it would leave an earlier object with less than 40 % of its pixels
visible, so every painted object is annotated and recognisable. Annotations are the
VISIBLE masks as compressed RLE (COCO ``iscrowd=0``), their tight boxes (COCO xywh, pixel
edges) and areas; each also carries ``visible_fraction`` (visible / unoccluded pixels),
a non-COCO field that tests use to check occlusion.

Layout written by :func:`generate_synthetic` (file names relative to the image folders)::

    out_dir/meta.json              generation parameters (used to detect a complete dataset)
    out_dir/train.json, val.json   COCO instances files
    out_dir/images/train/000000.png ...
    out_dir/images/val/000000.png ...

Every image comes from its own generator ``np.random.default_rng([seed, split, index])``,
so the same arguments always give byte-identical files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from maskx_jax.data import masks as mask_lib
from maskx_jax.data.synthetic_shapes import CLASS_NAMES, CLASS_NAMES_24, SHAPES, rasterize

FORMAT_VERSION = 1
_SPLITS = {"train": 0, "val": 1}
_MIN_VISIBLE_FRACTION = 0.4
_MIN_VISIBLE_PIXELS = 20
_PLACEMENT_TRIES = 12


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a dataset variant draws: its classes, object sizes and counts, and camouflage.

    classes: class names (category ids 1..K in this order); diameter: (min, max) object size as a
    fraction of the image side (log-uniform); objects: (min, max) objects per image; camouflage: the
    probability that an object fades into the background across part of it (0: never).
    """

    classes: tuple[str, ...]
    diameter: tuple[float, float]
    objects: tuple[int, int]
    camouflage: float


VARIANTS: dict[str, Variant] = {
    "shapes10": Variant(CLASS_NAMES, (0.12, 0.42), (2, 8), 0.0),
    "shapes24": Variant(CLASS_NAMES_24, (0.22, 0.5), (2, 6), 0.75),
}


def _variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown synthetic dataset variant {name!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated dataset lives (all absolute paths)."""

    root: str
    train_json: str
    train_images: str
    val_json: str
    val_images: str


def _paths(root: str) -> SyntheticPaths:
    root = os.path.abspath(root)
    return SyntheticPaths(
        root=root,
        train_json=os.path.join(root, "train.json"),
        train_images=os.path.join(root, "images", "train"),
        val_json=os.path.join(root, "val.json"),
        val_images=os.path.join(root, "images", "val"),
    )


# ------------------------------------------------------------------------- painting
def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in 0..255: two random colours mixed by a random pattern."""
    c1, c2 = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    kind = int(rng.integers(5))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0.0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 0:  # flat
        t = np.zeros((size, size), np.float32)
    elif kind == 1:  # stripes
        t = (np.sin(2.0 * math.pi * along / rng.uniform(3.0, 10.0)) > 0).astype(np.float32)
    elif kind == 2:  # checker
        cell = int(rng.integers(3, 9))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    elif kind == 3:  # noise
        t = rng.random((size, size), dtype=np.float32)
    else:  # linear gradient
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
    return c1 + t[:, :, None] * (c2 - c1)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3]: a smooth random colour field blended with a texture."""
    grid = rng.uniform(0.0, 255.0, (int(rng.integers(2, 6)),) * 2 + (3,)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), np.float32)
    mix = rng.uniform(0.15, 0.5)
    return (1.0 - mix) * smooth + mix * _texture(rng, size)


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image, size: int) -> None:
    """Unannotated distractors: lines, dots and scribbles in random colours."""
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 13))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            pts = rng.uniform(0, size, (2, 2))
            draw.line([tuple(p) for p in pts], fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:
            x, y = rng.uniform(0, size, 2)
            r = rng.uniform(1.0, 3.0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            start = rng.uniform(0, size, 2)
            pts = start + np.cumsum(rng.normal(0.0, size * 0.05, (int(rng.integers(3, 7)), 2)), axis=0)
            draw.line([tuple(p) for p in pts], fill=colour, width=1)


@dataclasses.dataclass
class _Placed:
    """One object of a scene: class index (0..K-1), full and visible masks, where it was put."""

    cls: int
    full: np.ndarray
    visible: np.ndarray
    center: tuple[float, float]
    diameter: float


def _place_objects(rng: np.random.Generator, size: int, variant: Variant) -> list[_Placed]:
    """Draws the objects in paint order (``variant.objects`` of them, fewer when placements fail)."""
    names = variant.classes
    placed: list[_Placed] = []
    for _ in range(int(rng.integers(variant.objects[0], variant.objects[1] + 1))):
        for _ in range(_PLACEMENT_TRIES):
            cls = int(rng.integers(len(names)))
            lo, hi = SHAPES[names[cls]][2]
            diameter = size * math.exp(rng.uniform(math.log(variant.diameter[0]), math.log(variant.diameter[1])))
            aspect = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            angle = rng.uniform(0.0, 2.0 * math.pi)
            center = tuple(rng.uniform(0.12 * size, 0.88 * size, 2))
            full = rasterize(names[cls], diameter, aspect, angle, center, size)
            if full.sum() < 2 * _MIN_VISIBLE_PIXELS:
                continue
            if all((p.visible & ~full).sum() >= max(_MIN_VISIBLE_FRACTION * p.full.sum(), _MIN_VISIBLE_PIXELS)
                   for p in placed):
                for p in placed:
                    p.visible = p.visible & ~full
                placed.append(_Placed(cls, full, full.copy(), center, diameter))
                break
    return placed


def _camouflage_alpha(rng: np.random.Generator, obj: _Placed, size: int) -> np.ndarray:
    """float32 [size, size, 1] opacity of a camouflaged object along a random direction: 1 over the first
    42-68 % of its diameter, then fading over a quarter of the diameter to 0-0.25, which it keeps to the far
    side (7-33 % of the diameter)."""
    direction = rng.uniform(0.0, 2.0 * math.pi)
    start = rng.uniform(-0.15, 0.35)  # where the fade begins, in object radii from the centre
    floor = rng.uniform(0.0, 0.25)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = ((xx + 0.5 - obj.center[0]) * math.cos(direction)
             + (yy + 0.5 - obj.center[1]) * math.sin(direction)) / (obj.diameter / 2.0)
    ramp = np.clip(1.0 - (along - start) / 0.5, 0.0, 1.0)
    return (floor + (1.0 - floor) * ramp)[:, :, None].astype(np.float32)


def render_scene(seed: int, split: str, index: int, size: int,
                 variant: str = "shapes10") -> tuple[np.ndarray, list[dict]]:
    """One synthetic image and its instances.

    Args:
      seed, split ('train' | 'val'), index: identify the image; equal inputs, equal output.
      size: image side in pixels.
      variant: a :data:`VARIANTS` name.

    Returns:
      (uint8 [size, size, 3] RGB image, [{'category': 1..K, 'mask': bool [size, size]
      visible mask, 'visible_fraction': float}] in paint order).
    """
    spec = _variant(variant)
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    canvas = Image.fromarray(np.clip(_background(rng, size), 0, 255).astype(np.uint8))
    _draw_clutter(rng, canvas, size)
    image = np.asarray(canvas, np.float32).copy()
    objects = _place_objects(rng, size, spec)
    # Camouflage draws from a stream of its own: every other draw (and so shapes10's images, byte for byte, and
    # the annotations) is what it would be without camouflage.
    camo_rng = np.random.default_rng([seed, _SPLITS[split], index, 1]) if spec.camouflage > 0 else None
    for obj in objects:
        paint = _texture(rng, size)
        if camo_rng is not None and camo_rng.random() < spec.camouflage:
            alpha = _camouflage_alpha(camo_rng, obj, size)
            paint = alpha * paint + (1.0 - alpha) * image
        image[obj.full] = paint[obj.full]
    image += rng.normal(0.0, rng.uniform(2.0, 10.0), image.shape).astype(np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    instances = [{"category": obj.cls + 1, "mask": obj.visible,
                  "visible_fraction": float(obj.visible.sum() / obj.full.sum())} for obj in objects]
    return image, instances


# ------------------------------------------------------------------------- writing
def _write_split(root: str, split: str, num: int, size: int, seed: int, first_id: int, variant: str) -> None:
    image_dir = os.path.join(root, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(num):
        image, instances = render_scene(seed, split, i, size, variant)
        file_name = f"{i:06d}.png"
        Image.fromarray(image).save(os.path.join(image_dir, file_name), format="PNG")
        image_id = first_id + i
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for inst in instances:
            ys, xs = np.nonzero(inst["mask"])
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append({
                "id": len(annotations) + 1 + first_id * 100,
                "image_id": image_id,
                "category_id": inst["category"],
                # COCO xywh from pixel edges: pixel c spans [c, c + 1).
                "bbox": [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)],
                "area": float(inst["mask"].sum()),
                "iscrowd": 0,
                "segmentation": mask_lib.encode(inst["mask"]),
                "visible_fraction": round(inst["visible_fraction"], 4),
            })
    coco = {
        "info": {"description": f"maskx_jax synthetic shapes ({split})", "version": str(FORMAT_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                       for k, n in enumerate(_variant(variant).classes)],
    }
    with open(os.path.join(root, f"{split}.json"), "w") as f:
        json.dump(coco, f)


def _meta(num_train: int, num_val: int, image_size: int, seed: int, variant: str) -> dict:
    meta = {"format_version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "image_size": int(image_size), "seed": int(seed), "classes": list(_variant(variant).classes)}
    if variant != "shapes10":  # shapes10's meta.json predates variants: datasets already generated stay valid
        meta["variant"] = variant
    return meta


def is_complete(out_dir: str, num_train: int, num_val: int, image_size: int, seed: int,
                variant: str = "shapes10") -> bool:
    """True if ``out_dir`` holds a finished dataset generated with exactly these arguments."""
    paths = _paths(out_dir)
    try:
        with open(os.path.join(paths.root, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return (meta == _meta(num_train, num_val, image_size, seed, variant)
            and os.path.isfile(paths.train_json) and os.path.isfile(paths.val_json))


def generate_synthetic(out_dir: str, num_train: int = 600, num_val: int = 100, image_size: int = 128,
                       seed: int = 0, variant: str = "shapes10") -> SyntheticPaths:
    """Generates the dataset into ``out_dir`` unless a complete identical one is there.

    The dataset is written into a temporary sibling folder, ``meta.json`` last, and then
    renamed into place, so an interrupted run never leaves a half dataset that looks
    complete. An existing ``out_dir`` generated with other arguments is replaced. Concurrent
    callers (several hosts on a shared disk) are safe: whoever renames first wins, the
    others discard their copy.

    Args:
      out_dir: target folder.
      num_train, num_val: number of images per split.
      image_size: image side in pixels (``data.synthetic_image_size``).
      seed: generation seed (``data.synthetic_seed``).
      variant: a :data:`VARIANTS` name (``data.synthetic_variant``).

    Returns:
      :class:`SyntheticPaths`.
    """
    _variant(variant)  # an unknown name fails before anything is written
    paths = _paths(out_dir)
    if is_complete(out_dir, num_train, num_val, image_size, seed, variant):
        return paths
    parent = os.path.dirname(paths.root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(paths.root)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is meant to be shared
    try:
        _write_split(tmp, "train", num_train, image_size, seed, 1, variant)
        _write_split(tmp, "val", num_val, image_size, seed, num_train + 1, variant)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(_meta(num_train, num_val, image_size, seed, variant), f)
        if os.path.exists(paths.root) and not is_complete(out_dir, num_train, num_val, image_size, seed, variant):
            stale = tempfile.mkdtemp(prefix=f".{os.path.basename(paths.root)}.stale-", dir=parent)
            os.rename(paths.root, os.path.join(stale, "old"))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, paths.root)
        except OSError:
            # Someone else finished first: keep theirs if it is what we wanted.
            if not is_complete(out_dir, num_train, num_val, image_size, seed, variant):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return paths
