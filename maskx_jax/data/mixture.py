"""Two training sources as one: a box-only view of a source, their concatenation, and the
deterministic mix of the two in every batch.

Order (the two-source counterpart of ``pipeline.global_step_indices``): global sample
``g = step * B + b`` comes from the box source iff ``floor((g + 1) f) > floor(g f)``, with
``f = data.box_source_fraction`` as an exact fraction ``p / q`` (``q <= 10**6``), so every window of
``q`` consecutive samples holds exactly ``p`` box-source images and the mix is exact in the long
run, not only in expectation. The box source's ``k = floor(g f)``-th sample and the mask
source's ``k = g - floor(g f)``-th sample are then drawn through per-epoch permutations of their
own source (``np.random.default_rng([seed, stream, epoch])``, stream 0 for the mask source, the
stream of the single-source order, and 2 for the box source). Everything is a pure function of
(seed, step), so resumed runs see the same batches.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Sequence

import numpy as np

from maskx_jax.data.records import Example, ImageRecord, Source

MASK_STREAM = 0  # the stream pipeline.epoch_permutation uses: the single-source order
BOX_STREAM = 2  # stream 1 draws the flips


class BoxOnlySource:
    """A source seen through a class lookup table, with every mask dropped.

    Instances keep their boxes, crowd flags and images; ``load`` returns ``masks=None`` and
    ``has_segm`` False, so the pipeline writes ``gt_has_mask=False`` for all of them.

    Attributes:
      inner: the wrapped source.
      lut: int32 [K_inner+1]: inner contiguous id -> merged id (from ``vocab.merge_vocabularies``).
      class_names: the merged K+1 names.
      contiguous_to_cat_id: {} (this source is never evaluated against).
    """

    def __init__(self, inner: Source, lut: np.ndarray, class_names: Sequence[str]):
        self.inner = inner
        self.lut = np.asarray(lut, np.int32)
        self.class_names = tuple(class_names)
        self.contiguous_to_cat_id: dict[int, int] = {}
        self._no_masks = np.zeros((len(inner.class_names),), bool)

    def __len__(self) -> int:
        return len(self.inner)

    def record(self, index: int) -> ImageRecord:
        rec = self.inner.record(index)
        return dataclasses.replace(rec, instances=tuple(
            dataclasses.replace(i, category=int(self.lut[i.category]), segmentation=None) for i in rec.instances))

    def load(self, index: int, mask_classes: np.ndarray | None = None) -> Example | None:
        """The inner example with merged class ids and no masks (``mask_classes`` is ignored)."""
        del mask_classes
        ex = self.inner.load(index, self._no_masks)  # decode no mask at all
        if ex is None:
            return None
        return dataclasses.replace(ex, classes=self.lut[ex.classes].astype(np.int32),
                                   has_segm=np.zeros_like(ex.has_segm), masks=None)


class ConcatSource:
    """Sources one after another: indices ``[0, N_0)`` are ``parts[0]``, then ``parts[1]``, ...

    All parts must use the same contiguous class ids (``class_names``). ``record(i).index`` is
    the concatenated index ``i``.
    """

    def __init__(self, parts: Sequence[Source], class_names: Sequence[str]):
        self.parts = tuple(parts)
        self.class_names = tuple(class_names)
        self.contiguous_to_cat_id = dict(self.parts[0].contiguous_to_cat_id)
        self.sizes = tuple(len(p) for p in self.parts)
        self.starts = tuple(int(s) for s in np.cumsum((0,) + self.sizes[:-1]))

    def __len__(self) -> int:
        return int(sum(self.sizes))

    def locate(self, index: int) -> tuple[int, int]:
        """(part number, index inside that part) of concatenated ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        part = int(np.searchsorted(self.starts, index, side="right") - 1)
        return part, index - self.starts[part]

    def segment(self, index: int) -> tuple[int, int]:
        """(first concatenated index, size) of the part holding ``index``."""
        part, _ = self.locate(index)
        return self.starts[part], self.sizes[part]

    def record(self, index: int) -> ImageRecord:
        part, local = self.locate(index)
        return dataclasses.replace(self.parts[part].record(local), index=index)

    def load(self, index: int, mask_classes: np.ndarray | None = None) -> Example | None:
        part, local = self.locate(index)
        return self.parts[part].load(local, mask_classes)


def as_fraction(fraction: float) -> Fraction:
    """``fraction`` as an exact ratio of integers (denominator <= 10**6), strictly inside (0, 1)."""
    f = Fraction(float(fraction)).limit_denominator(10**6)
    if not 0 < f < 1:
        raise ValueError(f"data.box_source_fraction must be in (0, 1), got {fraction}")
    return f


def permuted(seed: int, stream: int, k: np.ndarray, num_records: int) -> np.ndarray:
    """int64 [len(k)]: the ``k``-th samples of a source drawn epoch by epoch without replacement."""
    k = np.asarray(k, np.int64)
    epochs, offsets = k // num_records, k % num_records
    out = np.empty(k.shape, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = np.random.default_rng([seed, stream, int(e)]).permutation(num_records)[offsets[sel]]
    return out


def from_box_source(samples: np.ndarray, fraction: float) -> np.ndarray:
    """bool [len(samples)]: whether each global sample number comes from the box source."""
    f = as_fraction(fraction)
    g = np.asarray(samples, np.int64)
    return ((g + 1) * f.numerator) // f.denominator > (g * f.numerator) // f.denominator


def mixed_step_indices(seed: int, step: int, batch_size: int, sizes: tuple[int, int], fraction: float) -> np.ndarray:
    """int64 [B]: indices into ``ConcatSource([mask source, box source])`` of the global batch of ``step``.

    Args:
      seed: ``train.seed``.
      step: training step.
      batch_size: global batch size B.
      sizes: (N_mask, N_box) records per source, both > 0.
      fraction: ``data.box_source_fraction``.
    """
    n_mask, n_box = sizes
    if n_mask <= 0 or n_box <= 0:
        raise ValueError(f"both training sources need records, got {n_mask} (mask source) and {n_box} (box source)")
    f = as_fraction(fraction)
    g = step * batch_size + np.arange(batch_size, dtype=np.int64)
    k_box = (g * f.numerator) // f.denominator
    box = from_box_source(g, fraction)
    out = np.empty((batch_size,), np.int64)
    out[~box] = permuted(seed, MASK_STREAM, (g - k_box)[~box], n_mask)
    out[box] = n_mask + permuted(seed, BOX_STREAM, k_box[box], n_box)
    return out
