"""Score any checkpoint on a COCO JSON: ``python -m maskx_jax.eval.cli`` (``maskx-evaluate``).

    python -m maskx_jax.eval.cli --checkpoint ckpt/maskrcnn --val-json coco/annotations/instances_val2017.json \\
        --val-images coco/val2017 --set-a voc --output metrics.json

``--checkpoint`` is a converted checkpoint (``convert.from_torch``), a ``train.py`` work directory or
``WORKDIR/checkpoints/<step>``. Prints and writes COCO AP / AP50 / AP75 / APs / APm / APl for boxes and masks,
for all classes, set A and set B (``--set-a``: class names or a preset, ``voc`` / ``nonvoc``; a work directory's
own split by default; ``all`` when nothing says otherwise). The model's labels are mapped to the JSON's
category ids as ``python -m maskx_jax.predict`` maps them: a work directory's dataset, a ``--config``'s, or
torchvision's COCO label space (label = category id) for a 91-class converted checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence


def evaluate_checkpoint(checkpoint: str, val_json: str, val_images: str, *, set_a: str | None = None,
                        config_path: str | None = None, step: int | None = None, min_size: int | None = None,
                        max_size: int | None = None, pad: tuple[int, int] | None = None, batch_size: int = 8,
                        max_images: int = 0, output: str | None = None, progress: bool = True,
                        verify: bool = True) -> dict:
    """The metrics dict of :func:`maskx_jax.eval.run.evaluate_model` (written to ``output`` when given)."""
    from maskx_jax.config import base_config
    from maskx_jax.data import pipeline
    from maskx_jax.eval.run import evaluate_model
    from maskx_jax.predictor import load_predictor

    predictor = load_predictor(checkpoint, config_path=config_path, step=step, min_size=min_size,
                               max_size=max_size, pad=pad, verify=verify)
    c = base_config()
    d = c.data
    d.source = "coco"
    # The split is read once for the validation set; as the (unused) training set the loader wants, too.
    d.train_json = d.val_json = os.path.abspath(val_json)
    d.train_images = d.val_images = os.path.abspath(val_images)
    d.min_size, d.max_size = predictor.min_size, predictor.max_size
    d.pad_height, d.pad_width = predictor.pad
    d.cache_dir = os.path.join(os.path.dirname(os.path.abspath(output or val_json)), ".maskx_eval_cache")
    if set_a is None and predictor.set_b_ids:  # a work directory's own split, by class name
        set_a = ",".join(n for i, n in enumerate(predictor.class_names) if i and i not in predictor.set_b_ids)
    d.set_a = set_a or "all"
    c.eval.batch_size = batch_size
    info = pipeline.load_datasets(c)
    names = {n.lower() for n in info.class_names[1:]}
    if not names & {n.lower() for n in predictor.class_names[1:]} and len(predictor.class_names) != 91:
        raise ValueError(f"the model's classes ({list(predictor.class_names[1:5])}...) share no name with "
                         f"{val_json}'s categories ({list(info.class_names[1:5])}...); give --config (the "
                         f"dataset the model was trained on) or --class-names")
    set_a_cat_ids = [info.contiguous_to_cat_id[i] for i in info.set_a_ids]
    batches = pipeline.make_eval_batches(c, "val", max_images=max_images, info=info)
    with_masks = bool(info.val_has_masks) and predictor.has_masks
    return evaluate_model(predictor.predict_fn, batches, info.val_json, predictor.contiguous_to_cat_id,
                                   set_a_cat_ids, output_json=output, with_masks=with_masks, progress=progress,
                                   verbose=True)


def main(argv: Sequence[str] | None = None) -> int:
    from maskx_jax.backends.cpu import xla_flags
    from maskx_jax.predict import parse_pad

    print(xla_flags.apply_for_entry_point(), file=sys.stderr)  # before anything starts a JAX backend

    p = argparse.ArgumentParser(prog="python -m maskx_jax.eval.cli", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted checkpoint, work directory or WORKDIR/checkpoints/N")
    p.add_argument("--val-json", required=True, help="COCO annotation file (instances_*.json)")
    p.add_argument("--val-images", required=True, help="its image folder")
    p.add_argument("--set-a", default=None, help="set A: class names (comma-separated) or voc / nonvoc / all")
    p.add_argument("--config", default=None, help="the experiment config the model was trained with (optional)")
    p.add_argument("--step", type=int, default=None, help="a work directory's checkpoint (default: the latest)")
    p.add_argument("--min-size", type=int, default=None)
    p.add_argument("--max-size", type=int, default=None)
    p.add_argument("--pad", type=parse_pad, default=None, help="static canvas HxW (multiples of 32)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=0, help="only the first N images (0 = all)")
    p.add_argument("--output", default=None, help="metrics JSON to write")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-checksums", action="store_true", help="do not check the weights' content hashes (logged)")
    args = p.parse_args(argv)
    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.val_json, args.val_images, set_a=args.set_a,
                                      config_path=args.config, step=args.step, min_size=args.min_size,
                                      max_size=args.max_size, pad=args.pad, batch_size=args.batch_size,
                                      max_images=args.max_images, output=args.output,
                                      progress=not args.no_progress, verify=not args.skip_checksums)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.output:
        print(f"metrics written to {args.output}")
    else:
        print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
