"""Run a detector on image files: one PNG per image (masks, boxes, class names, scores) and one
COCO-format results JSON.

    # a converted torchvision checkpoint (python -m convert.from_torch ...): its config is in the checkpoint
    python -m maskx_jax.predict --checkpoint ckpt/maskrcnn --images photos/ --output out/
    # a training work directory (latest checkpoint; or WORKDIR/checkpoints/<step> for another one)
    python -m maskx_jax.predict --checkpoint runs/demo/maskx --images a.jpg b.png --output out/
    python -m maskx_jax.predict --config configs/demo_synthetic.py --checkpoint runs/demo/maskx/checkpoints/250 \
        --images photos/ --output out/ --score-thresh 0.3

Checkpoints. A directory holding ``maskx_meta.json`` is a converted detector checkpoint
(:mod:`maskx_jax.checkpoint`): the architecture is the ``DetectorConfig`` stored in it and
``--config`` is optional (it then only supplies sizes, the score threshold and class names). A
directory holding ``config.json`` and ``checkpoints/`` is a training work directory
(:mod:`maskx_jax.workdir`): the model's variables alone are read from the latest checkpoint (``--step`` or a
``WORKDIR/checkpoints/<step>`` path picks another; no optimiser or trainer is built), checked against their
recorded content hashes and against the model; the config is ``--config`` when given (checked against the
work directory's: an architecture difference is refused), else the saved ``config.json``. A work directory's
model predicts data-parallel over every device (``--batch-size`` defaults to the device count).

Class names: ``--class-names FILE`` (one name per line, K foreground names or K+1 with the
background first) wins; else a work directory's dataset (``DatasetInfo``, which also tells the
set-B classes of a Mask^X model: drawn dashed with a ``*``); else torchvision's COCO names for a
91-class converted checkpoint; else ``class N``.

Static shapes: every image is resized with torchvision's rule (``--min-size``, ``--max-size``) and,
if it does not fit, shrunk further to fit one padded canvas (``--pad HxW``, default the config's
``data.pad_height x data.pad_width``, or ``min_size x max_size`` rounded up to 32), exactly as the
training pipeline does, so the whole run compiles ``predict`` once. Images of any mode (grayscale,
RGBA, palette, 16-bit) and odd sizes are read with :mod:`maskx_jax.data.image_io`; unreadable
files are skipped and counted.

Outputs in ``--output``: ``<image stem>.png`` per image (detections with score >= ``--score-thresh``),
``results.json`` (every detection above the model's ``box_score_thresh``, COCO results format:
``image_id``, ``category_id``, ``bbox`` XYWH, ``score``, RLE ``segmentation``) and ``images.json``
(COCO ``images`` and ``categories`` lists naming what the ids mean). Image ids are the file
stems when every stem is a distinct integer (COCO's ``000000397133.jpg``: the results can be
scored against the official annotations directly), else 1..N in input order.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging as logging_std
import os
import sys
from typing import Sequence

import numpy as np

from maskx_jax.backends.cpu import xla_flags
from maskx_jax.predictor import Predictor, load_predictor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
RESULTS_FILE = "results.json"
IMAGES_FILE = "images.json"

log = logging_std.getLogger("maskx_jax.predict")


# --------------------------------------------------------------------------- inputs


def list_images(paths: Sequence[str]) -> list[str]:
    """Files named on the command line (kept as given) and the image files of named directories
    (by extension, sorted, not recursive)."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(os.path.join(p, n) for n in sorted(os.listdir(p))
                       if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(p, n)))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"--images: {p} is neither a file nor a directory")
    return out


def image_ids_for(paths: Sequence[str]) -> list[int]:
    """The file stems as ids when all are distinct integers (COCO file names), else 1..N."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def output_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.png`` per input; repeated stems (a/x.jpg, b/x.jpg) get ``_1``, ``_2`` ... suffixes."""
    used: set[str] = set()
    names = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        name, k = stem, 0
        while name.lower() in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name.lower())
        names.append(name + ".png")
    return names


def parse_pad(text: str) -> tuple[int, int]:
    """``"800x1344"`` / ``"800,1344"`` / ``"1024"`` (square) -> (800, 1344); multiples of 32."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pad must look like HxW (e.g. 800x1344), got {text!r}") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise argparse.ArgumentTypeError(f"--pad {h}x{w}: both sides must be positive multiples of 32")
    return h, w


def prepare_images(images: Sequence[np.ndarray], min_size: int, max_size: int, pad: tuple[int, int],
                   batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 HWC images -> (images [B, Hp, Wp, 3] float32, image_sizes [B, 2], original_sizes [B, 2]).

    The training pipeline's resize (:func:`maskx_jax.data.prepare.fit_size`: torchvision's rule,
    then shrunk to fit ``pad``) and normalisation. Rows past ``len(images)`` (up to ``batch_size``)
    are zero padding images with sizes equal to the canvas.
    """
    from maskx_jax import transform
    from maskx_jax.data.prepare import PrepareOptions, fit_size

    b = batch_size or len(images)
    opts = PrepareOptions(min_size=int(min_size), max_size=int(max_size), pad_height=pad[0], pad_width=pad[1],
                          max_instances=0, mask_crop_size=1, has_mask_by_class=np.zeros((1,), bool))
    out = np.zeros((b, pad[0], pad[1], 3), np.float32)
    sizes = np.tile(np.asarray(pad, np.int32), (b, 1))
    originals = sizes.copy()
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        oh, ow = fit_size(h, w, opts)
        out[i, :oh, :ow] = transform.bilinear_resize(transform.normalize(transform.to_rgb_float(image)), oh, ow)
        sizes[i] = (oh, ow)
        originals[i] = (h, w)
    return out, sizes, originals


# --------------------------------------------------------------------------- running


def _read(path: str, issues) -> np.ndarray | None:
    from maskx_jax.data.image_io import decode_image

    return decode_image(path, os.path.basename(path), issues, exif_transpose=True)


def run(predictor: Predictor, paths: Sequence[str], output: str, *, score_thresh: float | None = None,
        progress: bool = True) -> dict:
    """Predict on ``paths``; write pictures, ``results.json`` and ``images.json`` to ``output``.

    Returns a summary {images, skipped, detections, drawn, pictures: [paths], results: path}.
    """
    import jax
    from tqdm.auto import tqdm

    from maskx_jax import visualize
    from maskx_jax.data.issues import Issues
    from maskx_jax.eval.coco_results import detections_to_coco
    from maskx_jax.eval.pictures import PASTE_PIXELS, draw_row
    from maskx_jax.one_behind import OneBehind

    thresh = predictor.score_thresh if score_thresh is None else float(score_thresh)
    os.makedirs(output, exist_ok=True)
    ids = image_ids_for(paths)
    names = output_names(paths)
    bsz = max(1, int(predictor.batch_size))
    issues = Issues()
    results: list[dict] = []
    images_meta: list[dict] = []
    pictures: list[str] = []
    skipped: list[str] = []
    drawn = 0

    def load(chunk: range):
        decoded = [(i, _read(paths[i], issues)) for i in chunk]
        for i, img in decoded:
            if img is None:
                skipped.append(paths[i])
        good = [(i, img) for i, img in decoded if img is not None]
        if not good:
            return None
        arrays = prepare_images([img for _, img in good], predictor.min_size, predictor.max_size, predictor.pad,
                                batch_size=bsz)
        return good, arrays

    def finish(pending) -> None:
        nonlocal drawn
        det, (good, (_, sizes, originals)) = pending
        det = jax.device_get(det)
        for row, (i, image) in enumerate(good):
            one = jax.tree.map(lambda x: np.asarray(x)[row:row + 1], det)
            keep = np.flatnonzero(np.asarray(one.valid[0]))
            h, w = image.shape[:2]
            # Masks are pasted at the original resolution: 16 at a time (the paste's smallest row
            # bucket) for big photos, all at once for COCO-sized images; bounds the float32 canvas.
            step = max(16, int(PASTE_PIXELS // max(h * w, 1)))
            res = []
            for start in range(0, keep.size, step):
                valid = np.zeros_like(one.valid)
                valid[0, keep[start:start + step]] = True
                res += detections_to_coco(one.replace(valid=valid), np.array([ids[i]]), sizes[row:row + 1],
                                          originals[row:row + 1], predictor.contiguous_to_cat_id,
                                          with_masks=predictor.has_masks)
            assert len(res) == keep.size, (len(res), keep.size)  # one result per valid detection, in order
            results.extend(res)
            images_meta.append({"id": int(ids[i]), "file_name": os.path.abspath(paths[i]), "height": int(h),
                                "width": int(w), "picture": names[i]})
            picture, shown = draw_row(image, one, 0, sizes[row], score_thresh=thresh,
                                        class_names=predictor.class_names, set_b_ids=predictor.set_b_ids,
                                        with_masks=predictor.has_masks)
            path = os.path.join(output, names[i])
            visualize.save_png(path, picture)
            pictures.append(path)
            drawn += shown
            bar.update(1)

    chunks = [range(s, min(s + bsz, len(paths))) for s in range(0, len(paths), bsz)]
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
    behind = OneBehind(finish)  # a batch's detections are converted while the next batch runs
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskx-predict-load") as pool:
        upcoming = pool.submit(load, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            loaded = upcoming.result()
            # decode the next batch meanwhile (only one batch ahead is held in memory)
            upcoming = pool.submit(load, chunks[k + 1]) if k + 1 < len(chunks) else None
            if loaded is None:
                bar.update(len(chunks[k]))
                continue
            good, (images, sizes, _) = loaded
            det = predictor.predict_fn(images, sizes)
            bar.update(len(chunks[k]) - len(good))
            behind.push((det, loaded))
        behind.flush()
    bar.close()

    results_path = os.path.join(output, RESULTS_FILE)
    with open(results_path, "w") as f:
        json.dump(results, f)
    categories = [{"id": int(predictor.contiguous_to_cat_id[i]), "name": predictor.class_names[i]}
                  for i in range(1, predictor.num_classes) if i in predictor.contiguous_to_cat_id]
    with open(os.path.join(output, IMAGES_FILE), "w") as f:
        json.dump({"images": images_meta, "categories": categories}, f, indent=1)
    return {"images": len(images_meta), "skipped": skipped, "detections": len(results), "drawn": drawn,
            "pictures": pictures, "results": results_path}


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maskx_jax.predict",
                                description="Draw and save Mask R-CNN / Mask^X R-CNN predictions on image files.")
    p.add_argument("--checkpoint", required=True,
                   help="converted checkpoint directory (convert.from_torch), a training work directory, "
                        "or WORKDIR/checkpoints/<step>")
    p.add_argument("--images", required=True, nargs="+", help="image files and/or directories of images")
    p.add_argument("--output", required=True, help="directory for the PNGs, results.json and images.json")
    p.add_argument("--config", default=None, help="experiment config file (configs/*.py); optional")
    p.add_argument("--step", type=int, default=None, help="work directory: checkpoint step (default: latest)")
    p.add_argument("--class-names", default=None, help="file with one class name per line (K, or K+1 with background)")
    p.add_argument("--score-thresh", type=float, default=None,
                   help="draw detections scoring at least this (default: eval.picture_score_thresh, or 0.5); "
                        "results.json keeps every detection")
    p.add_argument("--min-size", type=int, default=None, help="resize: shorter side (default data.min_size or 800)")
    p.add_argument("--max-size", type=int, default=None,
                   help="resize: longer side at most (default data.max_size or 1333)")
    p.add_argument("--pad", type=parse_pad, default=None,
                   help="static canvas HxW, multiples of 32 (default data.pad_height x pad_width, or derived "
                        "from --min-size/--max-size); images are shrunk to fit")
    p.add_argument("--batch-size", type=int, default=None, help="images per predict call (default: device count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--skip-checksums", action="store_true",
                   help="do not check the weights against their saved content hashes (logged)")
    p.epilog = ("Any config key can be overridden as in train.py, e.g. --config.model.box_score_thresh=0.3 "
                "(applied to --config's config, or to the work directory's).")
    return p


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) arguments apart from the others."""
    rest, overrides, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config."):].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg}: no value")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv, overrides = _split_overrides(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    logging_std.basicConfig(level=logging_std.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging_std.INFO)
    log.info(xla_flags.apply_for_entry_point())  # before anything starts a JAX backend
    # Grayscale / RGBA / palette inputs are converted as a matter of course here; unreadable files are
    # reported once at the end, so the data layer's per-file repair warnings are not needed.
    logging_std.getLogger("maskx_jax.data").setLevel(logging_std.ERROR)
    try:
        paths = list_images(args.images)
        if not paths:
            raise FileNotFoundError(f"no image files in {args.images} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        predictor = load_predictor(args.checkpoint, config_path=args.config, step=args.step,
                                   class_names_file=args.class_names, min_size=args.min_size,
                                   max_size=args.max_size, pad=args.pad, score_thresh=args.score_thresh,
                                   batch_size=args.batch_size, overrides=overrides, verify=not args.skip_checksums)
    except (FileNotFoundError, ValueError) as e:  # integrity.CorruptCheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("%s; %d image(s), canvas %dx%d (min_size %d, max_size %d), batch %d, drawing scores >= %.2f",
             predictor.description, len(paths), predictor.pad[0], predictor.pad[1], predictor.min_size,
             predictor.max_size, predictor.batch_size, predictor.score_thresh)
    summary = run(predictor, paths, args.output, progress=not args.no_progress)
    if summary["skipped"]:
        log.warning("%d unreadable image(s) skipped: %s", len(summary["skipped"]), summary["skipped"][:5])
    print(f"wrote {len(summary['pictures'])} picture(s) ({summary['drawn']} detections drawn) and "
          f"{summary['detections']} detections to {summary['results']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
