"""Loading a model for inference: a converted checkpoint or a training work directory becomes a :class:`Predictor`
(the compiled predict function, class names, set-B classes, the resize rule and canvas), without a trainer or an
optimiser. ``python -m maskx_jax.predict`` and ``maskx-evaluate`` load through :func:`load_predictor`; its
docstring and :mod:`maskx_jax.predict`'s say which checkpoint gives what.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging as logging_std
import math
import os
from typing import Any, Callable, Sequence

DEFAULT_MIN_SIZE = 800
DEFAULT_MAX_SIZE = 1333
DEFAULT_SCORE_THRESH = 0.5

log = logging_std.getLogger("maskx_jax.predict")


def derived_pad(min_size: int, max_size: int) -> tuple[int, int]:
    """A landscape canvas holding every landscape image resized by (min_size, max_size);
    portrait images are shrunk further to fit it (pass a square --pad to avoid that)."""
    up = lambda x: int(math.ceil(x / 32.0) * 32)
    return up(min(min_size, max_size)), up(max_size)


def read_class_names(path: str, num_classes: int) -> tuple[str, ...]:
    """K+1 names (index 0 background) from a file of K or K+1 lines (blank lines ignored)."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    k = num_classes - 1
    if len(names) == k:
        return ("__background__",) + tuple(names)
    if len(names) == num_classes:
        return tuple(names)
    raise ValueError(f"--class-names {path}: {len(names)} names, but the model has {k} classes "
                     f"(give {k} names, or {num_classes} with the background first)")


def torchvision_coco_names() -> tuple[str, ...]:
    """The 91 labels of torchvision's COCO detectors (label = COCO category id; unused ids 'N/A')."""
    from maskx_jax.data.classes import COCO_CATEGORIES

    names = ["N/A"] * 91
    names[0] = "__background__"
    for cat_id, name in COCO_CATEGORIES:
        names[cat_id] = name
    return tuple(names)


# --------------------------------------------------------------------------- model loading


@dataclasses.dataclass
class Predictor:
    """A loaded model and everything needed to run and draw it.

    predict_fn: ``(images [B, Hp, Wp, 3], image_sizes [B, 2]) -> Detections`` (host or device arrays).
    class_names: K+1 names indexed by label (index 0 background).
    contiguous_to_cat_id: label -> category id written to the results JSON.
    set_b_ids: labels whose masks come from weight transfer (drawn dashed, with ``*``).
    min_size, max_size, pad: resize rule and the static canvas (H, W).
    score_thresh: default drawing threshold.
    kind: 'converted' or 'workdir'; description: one line naming what was loaded.
    has_masks: False for a box-only model (a work directory trained with ``model.mask_mode=none``).
    """

    predict_fn: Callable[[Any, Any], Any]
    num_classes: int
    class_names: tuple[str, ...]
    contiguous_to_cat_id: dict[int, int]
    set_b_ids: tuple[int, ...]
    min_size: int
    max_size: int
    pad: tuple[int, int]
    score_thresh: float
    kind: str
    description: str
    batch_size: int = 1
    has_masks: bool = True


def load_config_file(path: str):
    """``get_config()`` of a config file (``configs/*.py``). Not :func:`config.validate`d: prediction needs
    no training data paths (a work directory's architecture is checked against its config.json)."""
    spec = importlib.util.spec_from_file_location("_maskx_predict_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"--config {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def load_converted_detector(directory: str, *, verify: bool = True):
    """:func:`maskx_jax.checkpoint.load_detector`: the model built abstractly (``nnx.eval_shape``) and
    filled from the checkpoint, no random initialisation (about a second instead of ~25 s for an R-50
    on a CPU). Every variable must be in the checkpoint with its shape, and nothing else may be.
    """
    from maskx_jax import checkpoint as ckpt_lib

    return ckpt_lib.load_detector(directory, verify=verify)


def _dataset_info(config):
    """The dataset's ``DatasetInfo`` (class names, set B), or None with a warning when it cannot be read."""
    from maskx_jax.train.datasets import load_datasets

    try:
        return load_datasets(config)
    except Exception as e:  # noqa: BLE001 - names are a nicety: fall back to 'class N'
        log.warning("could not read the dataset for class names (%s: %s); using 'class N' "
                    "(pass --class-names FILE)", type(e).__name__, e)
        return None


def _inference_overrides(cfg: Any, overrides: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """{DetectorConfig field: value} for the ``model.*`` inference-only keys among ``overrides``."""
    import ast

    from maskx_jax.train.config_checks import INFERENCE_ONLY_MODEL_KEYS

    out = {}
    for key, text in overrides:
        if key in INFERENCE_ONLY_MODEL_KEYS:
            name = key.split(".", 1)[1]
            out[name] = type(getattr(cfg, name))(ast.literal_eval(text))
    return out


def load_predictor(checkpoint: str, *, config_path: str | None = None, step: int | None = None,
                   class_names_file: str | None = None, min_size: int | None = None,
                   max_size: int | None = None, pad: tuple[int, int] | None = None,
                   score_thresh: float | None = None, batch_size: int | None = None,
                   overrides: Sequence[tuple[str, str]] = (), verify: bool = True) -> Predictor:
    """Load a converted checkpoint or a training work directory (see the module docstring).

    ``overrides``: ``[("section.key", "text")]`` from ``--config.section.key=text``, applied to the ``--config``
    file's config, else to the work directory's saved one (a converted checkpoint needs ``--config`` for them).
    ``verify``: check the weights against the content hashes saved with them (``False`` skips it, logged).
    """
    import jax

    from maskx_jax import checkpoint as ckpt_lib
    from maskx_jax import config as config_lib
    from maskx_jax import workdir as workdir_lib

    config = load_config_file(config_path) if config_path else None
    if config is not None:
        config_lib.apply_overrides(config, overrides)
    elif overrides and workdir_lib.find_workdir(checkpoint) is None:
        # A converted checkpoint fixes the architecture; its inference settings may still change.
        from maskx_jax.train.config_checks import INFERENCE_ONLY_MODEL_KEYS

        fixed = [k for k, _ in overrides if k not in INFERENCE_ONLY_MODEL_KEYS]
        if fixed:
            raise ValueError(f"--config.{fixed[0]}: a converted checkpoint takes overrides of the inference settings "
                             f"only ({', '.join(sorted(INFERENCE_ONLY_MODEL_KEYS))}); give --config for the others")
    class_names = None
    cat_ids = None
    set_b: tuple[int, ...] = ()
    workdir = workdir_lib.find_workdir(checkpoint)
    if os.path.isfile(os.path.join(checkpoint, ckpt_lib.META_FILE)):
        from maskx_jax.detector import make_predict_fn

        meta = ckpt_lib.read_meta(checkpoint)
        if meta.get("kind") == "box_detector":
            raise ValueError(f"{checkpoint} holds a box-only detector (a converted Faster R-CNN, no mask branch); "
                             "train its mask branch first (train.init_checkpoint, README 'Stage-wise Mask^X')")
        if meta.get("kind") != "detector":
            raise ValueError(f"{checkpoint} holds a {meta.get('kind')!r} checkpoint (a backbone), not a detector")
        model = load_converted_detector(checkpoint, verify=verify)
        changes = _inference_overrides(model.cfg, overrides)
        if changes:  # --config.model.box_score_thresh=... and the like: the architecture stays the checkpoint's
            model.cfg = dataclasses.replace(model.cfg, **changes)
        num_classes = int(model.cfg.num_classes)
        jitted = make_predict_fn(model)
        predict_fn = lambda images, sizes: jitted(images, sizes)
        kind = "converted"
        description = (f"converted detector {checkpoint} (R-{model.cfg.depth}-FPN, {num_classes - 1} classes, "
                       f"mask_mode={model.cfg.mask_mode}, source {meta.get('source') or '?'})")
        if config is not None and class_names_file is None:
            info = _dataset_info(config)
            if info is not None and info.num_classes == num_classes:
                class_names, cat_ids = info.class_names, dict(info.contiguous_to_cat_id)
            elif info is not None:
                log.warning("the config's dataset has %d classes, the checkpoint %d: not using its names",
                            info.num_classes - 1, num_classes - 1)
        if class_names is None and class_names_file is None and num_classes == 91:
            class_names = torchvision_coco_names()  # torchvision's COCO label space: label = category id
    elif workdir is not None:
        from maskx_jax.parallel_predict import model_predict_fn
        from maskx_jax.train import config_checks
        from maskx_jax.train.distributed import create_mesh

        workdir, path_step = workdir
        step = path_step if step is None else step
        if config is None:
            config = workdir_lib.read_config(workdir)
            config_lib.apply_overrides(config, overrides)
        else:
            config_checks.check_resume_config(workdir, config)  # refuses another architecture, with a diff
        # The weights alone (no optimiser, no trainer), checked against their recorded hashes and the model.
        model, meta = workdir_lib.load_model(workdir, step, config=config, verify=verify)
        step, num_classes = meta["step"], meta["num_classes"]
        info = _dataset_info(config) if class_names_file is None else None
        if info is not None and info.num_classes == num_classes:
            class_names, cat_ids, set_b = info.class_names, dict(info.contiguous_to_cat_id), tuple(info.set_b_ids)
        elif info is not None:
            log.warning("the dataset has %d classes, the checkpoint %d: not using its names",
                        info.num_classes - 1, num_classes - 1)
        predict_fn = model_predict_fn(model, create_mesh())
        kind = "workdir"
        description = (f"{workdir} step {step} (R-{config.model.depth}-FPN, {num_classes - 1} classes, "
                       f"mask_mode={config.model.mask_mode})")
    else:
        raise FileNotFoundError(
            f"{checkpoint} is neither a converted checkpoint (no {ckpt_lib.META_FILE}) nor a training work "
            f"directory (no config.json + checkpoints/) nor WORKDIR/checkpoints/<step>")

    if class_names_file is not None:
        class_names = read_class_names(class_names_file, num_classes)
    if class_names is None:
        class_names = ("__background__",) + tuple(f"class {i}" for i in range(1, num_classes))
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class model")
    if cat_ids is None:
        cat_ids = {i: i for i in range(1, num_classes)}

    # Sizes: flags, else the config's data section, else torchvision's 800/1333.
    d = config.data if config is not None else None
    sizes_given = min_size is not None or max_size is not None
    min_size = int(min_size or (d.min_size if d is not None else DEFAULT_MIN_SIZE))
    max_size = int(max_size or (d.max_size if d is not None else DEFAULT_MAX_SIZE))
    if pad is None:
        pad = derived_pad(min_size, max_size) if (d is None or sizes_given) else (int(d.pad_height), int(d.pad_width))
    if score_thresh is None:
        score_thresh = float(config.eval.picture_score_thresh) if config is not None else DEFAULT_SCORE_THRESH
    if batch_size is None:
        batch_size = jax.device_count() if kind == "workdir" else 1
    return Predictor(predict_fn=predict_fn, num_classes=num_classes, class_names=tuple(class_names),
                     contiguous_to_cat_id=cat_ids, set_b_ids=set_b, min_size=min_size, max_size=max_size,
                     pad=tuple(pad), score_thresh=float(score_thresh), kind=kind, description=description,
                     batch_size=int(batch_size),
                     has_masks=not (kind == "workdir" and config.model.mask_mode == "none"))
