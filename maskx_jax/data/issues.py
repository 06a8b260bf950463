"""Counted warnings for bad input records: every repair or skip is named, logged and counted.

A data source never crashes on a bad record and never drops one silently. Each problem
goes through :meth:`Issues.warn` with a *kind* (a short snake_case key from :data:`KINDS`),
the record's name (file name, image id, annotation id) and a detail string. A (kind,
record) pair is counted once, however often the record is decoded again in later epochs,
so the counts read "how many records had this problem".

The object is shared between threads, hence the lock. Decoding worker processes each get a
pickled copy: a copy made by unpickling does not log; it keeps the problems it sees from then
on until :meth:`drain` hands them over, and the pipeline passes them, with the batch they came
from, to :meth:`absorb` on the original object, which counts and logs them once.
"""
from __future__ import annotations

import collections
import logging
import threading

logger = logging.getLogger("maskx_jax.data")

# Every kind a source may report, with what was done about it. Kinds not listed here are
# allowed (reported as-is) so that a new check never crashes the report.
KINDS = {
    # image files
    "image_missing": "image file not found: image skipped",
    "image_unreadable": "image file corrupt/truncated/not an image: skipped (train: the next "
                        "image is used in its place; eval: a black image is used)",
    "image_too_large": "more pixels than PIL.Image.MAX_IMAGE_PIXELS (decompression-bomb guard): never "
                       "decoded; skipped (when only found at decoding: replaced as image_unreadable)",
    "image_size_mismatch": "decoded size differs from the annotation's: image resized to it",
    "image_bad_size": "annotation width/height missing or invalid: read from the file header",
    "image_grayscale": "grayscale image: converted to RGB",
    "image_rgba": "image with alpha: alpha dropped",
    "image_16bit": "16-bit image: scaled to 8 bits",
    "image_other_mode": "unusual pixel mode (palette, CMYK, float, ...): converted to RGB",
    "image_exif_rotated": "EXIF orientation applied (prediction on photos only)",
    "image_duplicate_id": "duplicate image id: later record skipped",
    "image_malformed": "image record malformed (no id/file_name): skipped",
    "image_no_annotations": "training image with no usable non-crowd instance: skipped",
    # annotations
    "annotation_malformed": "annotation record malformed: skipped",
    "annotation_unknown_image": "annotation refers to an unknown image id: skipped",
    "unknown_category": "annotation has a category id not in the category list: skipped",
    "box_invalid": "box missing or not 4 finite numbers: annotation skipped",
    "box_negative_size": "box with negative width/height: annotation skipped",
    "box_degenerate": "box with zero width/height: annotation skipped",
    "box_outside_image": "box does not overlap the image: annotation skipped",
    "box_clipped": "box partly outside the image: clipped to it",
    "polygon_too_few_points": "polygon part with < 3 points: part dropped",
    "segmentation_empty": "absent/empty/invalid segmentation: instance kept as box-only (no mask); under "
                          "data.mask_supervision=by_annotation an absent, null or [] one is box-only by intent "
                          "and not reported",
    "rle_size_mismatch": "RLE size differs from the image size: instance kept as box-only",
    "too_many_instances": "more instances than data.max_instances: extras dropped",
    "duplicate_category": "duplicate category id: later entry ignored",
}


class Issues:
    """Thread-safe per-kind counter of repaired/skipped records.

    Attributes are private; use :meth:`warn`, :meth:`counts`, :meth:`summary`, :meth:`report`.
    """

    def __init__(self, max_examples: int = 5, max_logged_per_kind: int = 20):
        self._lock = threading.Lock()
        self._max_logged = max_logged_per_kind
        self._seen: set[tuple[str, str]] = set()
        self._counts: collections.Counter[str] = collections.Counter()
        self._examples: dict[str, list[str]] = collections.defaultdict(list)
        self._max_examples = max_examples
        # Set only on an unpickled copy (a worker process): problems to hand to the original.
        self._forward: list[tuple[str, str, str]] | None = None

    def __getstate__(self) -> dict:
        with self._lock:
            state = {k: v for k, v in self.__dict__.items() if k != "_lock"}
            state["_seen"] = set(self._seen)
        state["_forward"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._forward = []

    def drain(self) -> list[tuple[str, str, str]]:
        """(kind, record, detail) of each problem first seen since the last call, on a copy in a
        worker process; [] on the original (it counted and logged them already)."""
        with self._lock:
            if self._forward is None:
                return []
            out, self._forward = self._forward, []
        return out

    def absorb(self, problems: list[tuple[str, str, str]]) -> None:
        """Counts and logs problems a worker's copy reported (:meth:`drain`); each (kind, record)
        still counts once."""
        for kind, record, detail in problems:
            self.warn(kind, record, detail)

    def warn(self, kind: str, record: str, detail: str = "") -> None:
        """Counts (once per (kind, record)) and logs one problem.

        Args:
          kind: problem key, normally one of :data:`KINDS`.
          record: names the record (e.g. ``"train.json image 42 (000042.png)"``).
          detail: what exactly was wrong / what was done.
        """
        key = (kind, record)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            if self._forward is not None:  # a worker's copy: the original counts and logs it
                self._forward.append((kind, record, detail))
                return
            self._counts[kind] += 1
            if len(self._examples[kind]) < self._max_examples:
                self._examples[kind].append(f"{record}: {detail}" if detail else record)
            count = self._counts[kind]
        # Log the first few of each kind; the rest are only counted (see report()), so a
        # dataset with thousands of grayscale images does not flood the training log.
        if count <= self._max_logged:
            logger.warning("data %s: %s%s", kind, record, f" ({detail})" if detail else "")
        if count == self._max_logged:
            logger.warning("data %s: further records of this kind are counted but not logged", kind)

    def counts(self) -> dict[str, int]:
        """{kind: number of distinct records with that problem}."""
        with self._lock:
            return dict(self._counts)

    def summary(self) -> dict[str, int]:
        """Same as :meth:`counts` (sorted by kind)."""
        return dict(sorted(self.counts().items()))

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def report(self) -> str:
        """A printable multi-line table: kind, count, what was done, a few example records."""
        with self._lock:
            counts = dict(self._counts)
            examples = {k: list(v) for k, v in self._examples.items()}
        if not counts:
            return "data: no bad records"
        lines = [f"data: {sum(counts.values())} record problem(s) repaired or skipped"]
        for kind in sorted(counts):
            lines.append(f"  {kind:26s} {counts[kind]:6d}  {KINDS.get(kind, '')}")
            for ex in examples.get(kind, []):
                lines.append(f"      e.g. {ex}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Issues({self.summary()})"
