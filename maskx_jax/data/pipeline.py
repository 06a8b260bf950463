"""Datasets -> static-shape :class:`~maskx_jax.types.Batch`es, with exact resume.

Entry points:
  * :func:`load_datasets` -> :class:`DatasetInfo` (classes, set A, id maps, sources, issues);
  * :func:`make_train_iterator` -> :class:`TrainIterator`: the process-local training
    batches for steps ``start_step, start_step + 1, ...`` forever;
  * :func:`make_eval_batches` -> ``(Batch, [ImageRecord])`` over a split, in order.

Deterministic order (so a resumed run sees exactly the batches it would have seen):
the global batch of step s is a pure function of (``train.seed``, s). Position b of step s
is the global sample ``g = s * B + b`` (B = ``train.batch_size``); it lies in epoch
``e = g // N`` at offset ``g % N`` of that epoch's permutation
``np.random.default_rng([seed, 0, e]).permutation(N)``; its flip is
``np.random.default_rng([seed, 1, s, b]).random() < data.hflip_prob``. Process p of P
gets the contiguous positions ``[p * B / P, (p + 1) * B / P)``, so the processes' local
batches concatenate (in process order) into the global batch. An image that turns out to
be unreadable is replaced by the next readable record of the dataset (counted), which is
deterministic too. With a second, box-only training source (``data.box_source``) each sample
g is first assigned to a source, then drawn from that source's own epoch permutations (see
:mod:`maskx_jax.data.mixture`); flips are drawn as above.

Batches are NumPy arrays inside a ``Batch``; decoding and augmentation run in
``data.num_workers`` worker processes (0: a thread of this process), ``data.prefetch`` batches
ahead (:mod:`maskx_jax.data.loader`). A record's problems found in a worker are counted in
``info.issues`` when its batch is consumed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import ml_collections
import numpy as np

from maskx_jax.data import loader, prepare, sources
from maskx_jax.data.classes import has_mask_by_class, mask_counts, parse_set_a, set_a_from_annotations
from maskx_jax.data.issues import Issues
from maskx_jax.data.mixture import BoxOnlySource, ConcatSource, mixed_step_indices
from maskx_jax.data.loader import BatchStream
from maskx_jax.data.records import STANDIN_IMAGE_SIZE, Example, ImageRecord, Source
from maskx_jax.data.vocab import merge_vocabularies, read_class_map
from maskx_jax.types import Batch


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
    """Everything the rest of the library needs to know about the data.

    Attributes:
      source: ``data.source`` ('synthetic' | 'coco' | 'tfds').
      class_names: K+1 names, index 0 ``'__background__'`` (with a box source: the merged
        vocabulary, ``data.source``'s classes first; see :mod:`maskx_jax.data.vocab`).
      num_classes: K+1 (the detector's class count, background included).
      set_a_ids: contiguous ids (1..K) of the mask-supervised classes (set A): ``data.set_a``
        (``mask_supervision='by_class'``) or the classes with >= 1 mask annotation in the
        training data (``'by_annotation'``).
      set_b_ids: the other foreground ids.
      has_mask_by_class: bool [K+1], True at set-A ids.
      cat_id_to_contiguous: {category id in the evaluation JSON: contiguous id}.
      contiguous_to_cat_id: {contiguous id: category id in the evaluation JSON} (use it to
        write detections for pycocotools).
      val_json: COCO JSON to evaluate against ('' when there is no validation set); a cleaned
        copy under ``data.cache_dir`` when the original had bad records.
      val_has_masks: False when the validation ground truth has no masks (tfds): box AP only.
      train, val: the sources (``len()``, ``record(i)``, ``load(i)``); val may be None. With a
        box source, ``train`` is a :class:`~maskx_jax.data.mixture.ConcatSource` (mask source
        records first, then the box source's).
      issues: the shared counter of repaired/skipped records (grows while decoding).
      mask_supervision: ``data.mask_supervision``.
      mask_counts: int64 [K+1]: non-crowd training instances with a mask annotation, per class
        (``data.source`` only; 0 for sources that list no instances before decoding: tfds).
      box_source: ``data.box_source`` ('' = none).
      train_sizes: records per training source: (N,) or (N_mask_source, N_box_source).
      box_source_fraction: share of training samples drawn from the box source (0 without one).
      unscored_ids: classes without a category in the validation JSON (added by the box
        source): their detections cannot be scored and are left out of evaluation.
    """

    source: str
    class_names: tuple[str, ...]
    num_classes: int
    set_a_ids: tuple[int, ...]
    set_b_ids: tuple[int, ...]
    has_mask_by_class: np.ndarray
    cat_id_to_contiguous: dict[int, int]
    contiguous_to_cat_id: dict[int, int]
    val_json: str
    val_has_masks: bool
    train: Source
    val: Source | None
    issues: Issues
    mask_supervision: str = "by_class"
    mask_counts: np.ndarray | None = None
    box_source: str = ""
    train_sizes: tuple[int, ...] = ()
    box_source_fraction: float = 0.0
    unscored_ids: tuple[int, ...] = ()

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return 0 if self.val is None else len(self.val)

    def train_indices(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """int64 [B]: indices into ``train`` of the global batch of ``step`` (module docstring;
        :mod:`maskx_jax.data.mixture` with a box source)."""
        if self.box_source:
            return mixed_step_indices(seed, step, batch_size, self.train_sizes, self.box_source_fraction)
        return global_step_indices(seed, step, batch_size, len(self.train))

    def summary(self) -> dict[str, int]:
        """{problem kind: number of records} so far (see :data:`maskx_jax.data.issues.KINDS`)."""
        return self.issues.summary()

    def report(self) -> str:
        """Printable dataset description plus the bad-record table."""
        head = (f"data: source={self.source} classes={self.num_classes - 1} train={self.num_train} "
                f"val={self.num_val} set A={[self.class_names[i] for i in self.set_a_ids]}")
        if self.mask_supervision == "by_annotation" and self.mask_counts is not None:
            counts = ", ".join(f"{self.class_names[i]} {int(self.mask_counts[i])}" for i in self.set_a_ids)
            head += f"\n  set A read from the annotations (by_annotation); masks per class: {counts}"
        if self.box_source:
            head += (f"\n  box source={self.box_source}: {self.train_sizes[1]} images (box-only), drawn for "
                     f"{self.box_source_fraction:g} of the training samples; {self.train_sizes[0]} from "
                     f"source={self.source}")
        if self.unscored_ids:
            head += (f"\n  not in the validation ground truth (detections not scored): "
                     f"{[self.class_names[i] for i in self.unscored_ids]}")
        return head + "\n" + self.issues.report()


# ----------------------------------------------------------------------------- loading
def load_datasets(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Opens the configured train/val sources and derives classes, set A and id maps.

    For ``data.source='synthetic'`` the dataset is generated first (once) into
    ``data.synthetic_dir``, then read through the COCO path. With ``data.box_source`` the
    box source's classes are merged into ``data.source``'s by name (:mod:`maskx_jax.data.vocab`)
    and its instances never carry a mask.

    Raises:
      ValueError: unknown class names in ``data.set_a`` (lists the valid ones), unmatched
        box-source classes, no mask annotation at all under ``by_annotation``, bad config.
      FileNotFoundError: missing annotation files / folders.
    """
    d = config.data
    issues = Issues()
    main = sources.open_train(d, issues)
    class_names = tuple(main.class_names)
    train: Source = main
    train_sizes: tuple[int, ...] = (len(main),)
    if d.box_source:
        box = sources.open_box_source(d, issues)
        class_map = read_class_map(d.box_source_class_map) if d.box_source_class_map else {}
        class_names, lut = merge_vocabularies(class_names, box.class_names, class_map, d.box_source_unmatched)
        box_view = BoxOnlySource(box, lut, class_names)
        train = ConcatSource([main, box_view], class_names)
        train_sizes = (len(main), len(box_view))
    num_classes = len(class_names)
    counts = mask_counts(getattr(main, "records", ()), num_classes)
    if d.mask_supervision == "by_annotation":
        set_a = set_a_from_annotations(counts)
    else:
        set_a = parse_set_a(d.set_a, class_names)  # before the validation split: fail fast
    val, val_json, id_map, val_has_masks = sources.open_val(d, class_names, issues, main.contiguous_to_cat_id)
    unscored = tuple(i for i in range(1, num_classes) if i not in id_map) if val is not None else ()
    return DatasetInfo(
        source=d.source,
        class_names=class_names,
        num_classes=num_classes,
        set_a_ids=set_a,
        set_b_ids=tuple(i for i in range(1, num_classes) if i not in set_a),
        has_mask_by_class=has_mask_by_class(set_a, num_classes),
        cat_id_to_contiguous={v: k for k, v in id_map.items()},
        contiguous_to_cat_id=dict(id_map),
        val_json=val_json,
        val_has_masks=val_has_masks,
        train=train,
        val=val,
        issues=issues,
        mask_supervision=str(d.mask_supervision),
        mask_counts=counts,
        box_source=str(d.box_source),
        train_sizes=train_sizes,
        box_source_fraction=float(d.box_source_fraction) if d.box_source else 0.0,
        unscored_ids=unscored,
    )


def prepare_options(config: ml_collections.ConfigDict, info: DatasetInfo) -> prepare.PrepareOptions:
    d = config.data
    return prepare.PrepareOptions(
        min_size=int(d.min_size), max_size=int(d.max_size), pad_height=int(d.pad_height),
        pad_width=int(d.pad_width), max_instances=int(d.max_instances),
        mask_crop_size=int(d.mask_crop_size), has_mask_by_class=info.has_mask_by_class,
    )


def _load_or_next(source: Source, index: int, mask_classes: np.ndarray) -> Example:
    """``source.load(index)``, or the next readable record (wrapping) if it cannot be decoded.

    With several training sources the replacement comes from the same source, so the mix of
    sources in a batch never changes.
    """
    start, n = source.segment(index) if isinstance(source, ConcatSource) else (0, len(source))
    for k in range(n):
        ex = source.load(start + (index - start + k) % n, mask_classes)
        if ex is not None:
            return ex
    raise RuntimeError("no image of the dataset can be decoded; see the data issue report")


# ----------------------------------------------------------------------------- training order
def epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """int64 [N]: the record order of one epoch."""
    return np.random.default_rng([seed, 0, epoch]).permutation(num_records)


def flip_decision(seed: int, step: int, position: int, prob: float) -> bool:
    """Whether global batch position ``position`` of step ``step`` is mirrored."""
    return bool(prob > 0 and np.random.default_rng([seed, 1, step, position]).random() < prob)


def global_step_indices(seed: int, step: int, batch_size: int, num_records: int) -> np.ndarray:
    """int64 [B]: record indices of the global batch of ``step`` (see module docstring)."""
    g = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs, offsets = g // num_records, g % num_records
    out = np.empty((batch_size,), np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_permutation(seed, int(e), num_records)[offsets[sel]]
    return out


class TrainBatchBuilder:
    """Step -> this process's slice of that step's global batch, as plain arrays (picklable: it is
    what a decoding worker process runs).

    ``builder(step)`` returns ``{"arrays": {Batch field: array}, "issues": [(kind, record,
    detail), ...]}``: the problems a worker's copy of the issue counter saw while building it,
    for :meth:`~maskx_jax.data.issues.Issues.absorb` in the consuming process ([] in-process).
    """

    def __init__(self, info: DatasetInfo, options: prepare.PrepareOptions, *, batch_size: int, seed: int,
                 hflip_prob: float, process_index: int, process_count: int):
        self.info = info
        self.options = options
        self.global_batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.seed = seed
        self.hflip_prob = hflip_prob
        self.process_index = process_index

    def __call__(self, step: int) -> dict:
        lo = self.process_index * self.local_batch_size
        indices = self.info.train_indices(self.seed, step, self.global_batch_size)
        arrays = prepare.allocate(self.local_batch_size, self.options, loader.zeros)
        for slot in range(self.local_batch_size):
            ex = _load_or_next(self.info.train, int(indices[lo + slot]), self.info.has_mask_by_class)
            flip = flip_decision(self.seed, step, lo + slot, self.hflip_prob)
            prepare.fill(arrays, slot, ex, self.options, flip, self.info.issues)
        return {"arrays": arrays, "issues": self.info.issues.drain()}


class TrainIterator:
    """Process-local training batches for steps ``start_step, start_step + 1, ...``, forever.

    Batches are built by :class:`TrainBatchBuilder` in a :class:`~maskx_jax.data.loader.BatchStream`
    (``num_workers`` worker processes, 0 = a thread of this process). Use as a context manager or
    call :meth:`close` to stop them. ``step`` is the step of the next batch ``next()`` returns.
    """

    def __init__(self, info: DatasetInfo, options: prepare.PrepareOptions, *, batch_size: int, seed: int,
                 hflip_prob: float, start_step: int, process_index: int, process_count: int,
                 num_workers: int, prefetch: int):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
        if batch_size % process_count:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the process count {process_count}")
        if len(info.train) == 0 or 0 in info.train_sizes:
            raise ValueError("the training set (or one of its sources) is empty (see the data issue report):\n"
                             + info.report())
        self.info = info
        self.global_batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.step = start_step
        build = TrainBatchBuilder(info, options, batch_size=batch_size, seed=seed, hflip_prob=hflip_prob,
                                  process_index=process_index, process_count=process_count)
        self._stream = BatchStream(build, start=start_step, num_workers=num_workers, prefetch=prefetch)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        out = next(self._stream)
        self.info.issues.absorb(out["issues"])
        self.step += 1
        return Batch(**out["arrays"])

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_train_iterator(config: ml_collections.ConfigDict, *, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1, info: DatasetInfo | None = None) -> TrainIterator:
    """Training batches for steps ``start_step, start_step + 1, ...`` (this process's slice).

    Args:
      config: the full config (``data.*``, ``train.batch_size`` global, ``train.seed``).
      start_step: first step to produce (resume from a checkpoint at this step).
      process_index, process_count: this host's slice of every global batch
        (``jax.process_index()``, ``jax.process_count()``).
      info: reuse already loaded datasets (else :func:`load_datasets` is called).

    Returns:
      :class:`TrainIterator` yielding ``Batch``es of ``train.batch_size // process_count``
      images (NumPy arrays, shapes in the ``Batch`` docstring).
    """
    info = info if info is not None else load_datasets(config)
    return TrainIterator(
        info, prepare_options(config, info), batch_size=int(config.train.batch_size), seed=int(config.train.seed),
        hflip_prob=float(config.data.hflip_prob), start_step=int(start_step), process_index=int(process_index),
        process_count=int(process_count), num_workers=int(config.data.num_workers), prefetch=int(config.data.prefetch),
    )


# ----------------------------------------------------------------------------- evaluation
def _eval_row(source: Source, index: int, arrays, slot: int, options: prepare.PrepareOptions,
              info: DatasetInfo) -> ImageRecord:
    record = source.record(index)
    ex = source.load(index, info.has_mask_by_class)
    if ex is None:
        # Evaluation must keep every image id: predict on a black image of the annotated size.
        h, w = (record.height, record.width) if record.height > 0 and record.width > 0 else (STANDIN_IMAGE_SIZE,) * 2
        ex = Example(image=np.zeros((h, w, 3), np.uint8), image_id=record.image_id, name=record.name,
                     boxes=np.zeros((0, 4), np.float32), classes=np.zeros((0,), np.int32),
                     crowd=np.zeros((0,), bool), has_segm=np.zeros((0,), bool), masks=None)
    prepare.fill(arrays, slot, ex, options, False, info.issues)
    if record.height <= 0:  # sources that only know the size once decoded (tfds)
        record = dataclasses.replace(record, image_id=ex.image_id, height=ex.height, width=ex.width)
    return record


class EvalBatchBuilder:
    """Batch number k -> ``{"arrays", "records", "issues"}`` for images ``[k * B, (k + 1) * B)`` of a
    split (picklable; see :class:`TrainBatchBuilder` for "issues")."""

    def __init__(self, info: DatasetInfo, source: Source, options: prepare.PrepareOptions, batch_size: int,
                 num_images: int):
        self.info = info
        self.source = source
        self.options = options
        self.batch_size = batch_size
        self.num_images = num_images

    def __call__(self, k: int) -> dict:
        arrays = prepare.allocate(self.batch_size, self.options, loader.zeros)
        indices = range(k * self.batch_size, min(self.num_images, (k + 1) * self.batch_size))
        records = [_eval_row(self.source, i, arrays, slot, self.options, self.info) for slot, i in enumerate(indices)]
        for slot in range(len(indices), self.batch_size):
            prepare.fill_padding(arrays, slot, self.options)
        return {"arrays": arrays, "records": records, "issues": self.info.issues.drain()}


def make_eval_batches(config: ml_collections.ConfigDict, split: str = "val", batch_size: int | None = None,
                      max_images: int = 0, *, info: DatasetInfo | None = None
                      ) -> Iterator[tuple[Batch, list[ImageRecord]]]:
    """Evaluation batches over a split, in dataset order, no augmentation.

    Args:
      config: the full config.
      split: 'val' or 'train'.
      batch_size: images per batch (default ``eval.batch_size``).
      max_images: only the first ``max_images`` images (0 = all).
      info: reuse already loaded datasets.

    Yields:
      (Batch, records): ``records[i]`` is the :class:`ImageRecord` of batch row i for
      ``i < len(records)``; the last batch is padded with rows whose ``image_ids`` are -1 (zero images, no
      instances). Close the generator (or exhaust it) to stop the decoding workers.
    """
    info = info if info is not None else load_datasets(config)
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    source = info.val if split == "val" else info.train
    if source is None:
        raise ValueError("no validation set configured (data.val_json / data.source)")
    bsz = int(batch_size or config.eval.batch_size)
    n = len(source) if max_images <= 0 else min(len(source), int(max_images))
    build = EvalBatchBuilder(info, source, prepare_options(config, info), bsz, n)
    with BatchStream(build, start=0, stop=math.ceil(n / bsz), num_workers=int(config.data.num_workers),
                     prefetch=int(config.data.prefetch)) as stream:
        for out in stream:
            info.issues.absorb(out["issues"])
            yield Batch(**out["arrays"]), out["records"]
