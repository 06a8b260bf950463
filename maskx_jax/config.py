"""The configuration schema: every key, its default and its meaning.

Experiment files in ``configs/`` start from :func:`base_config` and override what they need;
``train.py`` applies command-line overrides (``--config.train.steps=200``) on top. The returned
ConfigDict is locked, so a misspelt key is an error, and ml_collections rejects a value of the
wrong type. :func:`validate` checks the options against each other before anything compiles.
"""
from __future__ import annotations

from typing import Sequence

import ml_collections

from maskx_jax import optim
from maskx_jax.box_head import BOX_PREDICTOR_INITS
from maskx_jax.conv import CONV_IMPLS
from maskx_jax.detector_config import model_defaults

MASK_MODES = ("class_specific", "class_agnostic", "transfer", "none")
TRANSFER_INPUTS = ("cls", "box", "cls+box", "random")
ACTIVATIONS = ("leaky_relu", "relu")
NORMS = ("frozen_bn", "group_norm")
COMPUTE_DTYPES = ("float32", "bfloat16")
SOURCES = ("synthetic", "coco", "tfds")
SYNTHETIC_VARIANTS = ("shapes10", "shapes24")  # maskx_jax.data.synthetic.VARIANTS
MASK_SUPERVISION = ("by_class", "by_annotation")
BOX_SOURCES = ("", "coco", "tfds", "synthetic")  # data.box_source ("" = none)
UNMATCHED_POLICIES = ("error", "add")  # data.box_source_unmatched
ON_NONFINITE = ("stop", "skip")  # train.on_nonfinite
# train.shard_params: the variables that may be split over the mesh (fsdp-style). Only those whose sharded step was
# checked equal to one device (tests/integration/test_sharding.py); sharding the box classifier gave wrong mask-head
# gradients on XLA:CPU there (docs/scaling.md), so names are allowed one by one, after such a test.
SHARDABLE_PARAMS = ("mask_mlp",)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Every model key, its default and its meaning: maskx_jax/detector_config.py (one source, also read by
    # model_builder). The experiment's model is Mask^X, the paper's best variant (tau on cls+box detection
    # weights + MLP fusion); DetectorConfig's own default, which a converted torchvision checkpoint keeps, is
    # torchvision's class-specific Mask R-CNN.
    c.model = m = ml_collections.ConfigDict(model_defaults())
    m.mask_mode = "transfer"
    m.mlp_fusion = True

    c.data = d = ml_collections.ConfigDict()
    d.source = "synthetic"  # synthetic | coco | tfds
    d.train_json = ""  # COCO annotation file (source=coco)
    d.train_images = ""  # image folder (source=coco)
    d.val_json = ""  # COCO annotation file for evaluation
    d.val_images = ""  # its image folder
    d.tfds_name = "coco/2017"  # source=tfds (box-only: tfds coco has no instance masks)
    d.tfds_data_dir = ""  # local directory holding the prepared tfds dataset (nothing is downloaded)
    d.tfds_train_split = "train"  # tfds split used for training
    d.tfds_val_split = "validation"  # tfds split for evaluation when data.val_json is empty (box AP only)
    d.set_a = ""  # comma-separated class names with mask supervision, or a preset: voc | nonvoc | all
    # by_class: an instance supervises the mask loss iff its class is in data.set_a (and it has a mask);
    # by_annotation: iff its own annotation has a segmentation; set A = the classes with >= 1 such mask
    d.mask_supervision = "by_class"  # by_class | by_annotation
    d.min_size = 800  # resize: shorter side (torchvision rule)
    d.max_size = 1333  # resize: longer side at most
    d.pad_height = 800  # static padded input size (multiple of 32); images are resized to fit
    d.pad_width = 1344  # (see pad_height)
    d.max_instances = 100  # static instance slots per image (extra instances are dropped, counted)
    d.mask_crop_size = 56  # host-side per-instance mask crop resolution
    d.hflip_prob = 0.5  # training: horizontal flip probability
    d.num_workers = 2  # decoding worker processes (grain); 0 = a background thread of the training process
    d.prefetch = 4  # batches prepared ahead of the device
    d.drop_images_without_annotations = True  # train only: skip (counted) images with no usable non-crowd instance
    d.cache_dir = "runs/data_cache"  # derived files: cleaned validation JSON, tfds validation JSON
    # built-in synthetic dataset (generated on first use into data.synthetic_dir)
    d.synthetic_dir = "runs/synthetic_data"  # where the built-in dataset is generated (once)
    d.synthetic_num_train = 600  # synthetic training images
    d.synthetic_num_val = 100  # synthetic validation images
    d.synthetic_image_size = 128  # synthetic image side in pixels
    d.synthetic_seed = 0  # synthetic generator seed
    d.synthetic_variant = "shapes10"  # shapes10 (10 classes) | shapes24 (24 classes, camouflaged objects)
    # e.g. "ring:0,star:0.5": per class, the fraction of synthetic TRAINING instances that keep their mask
    # (unlisted: 1); the others become box-only
    d.synthetic_mask_fraction = ""
    # a second, box-only training source (Mask^X: boxes from one dataset, masks from data.source)
    # "" (none) | coco | tfds (data.tfds_* keys) | synthetic (built-in generator, data.synthetic_seed + 1)
    d.box_source = ""
    d.box_source_json = ""  # box_source=coco: COCO annotation file (segmentations, if any, are ignored)
    d.box_source_images = ""  # box_source=coco: its image folder
    # fraction of training images drawn from the box source (exact in every window of 1/fraction images)
    d.box_source_fraction = 0.5
    d.box_source_class_map = ""  # JSON file {"name in the box source": "canonical name"} for names that differ
    # box-source class matching no data.source class: error (list them) | add (a new set-B class)
    d.box_source_unmatched = "error"

    c.train = t = ml_collections.ConfigDict()
    t.batch_size = 16  # global, over all devices and hosts
    t.steps = 90000  # optimisation steps
    t.optimizer = "sgd"  # sgd (the paper: momentum, L2 decay added to the gradient) | adamw (decoupled decay)
    t.lr = 0.02  # peak learning rate (after warmup)
    t.momentum = 0.9  # SGD momentum
    t.weight_decay = 1e-4  # weight decay (sgd: added to the gradient as torch SGD; adamw: decoupled)
    t.warmup_steps = 1000  # linear warmup length
    t.warmup_factor = 0.001  # warmup starts at lr * this
    t.lr_steps = (60000, 80000)  # multiply the lr by lr_gamma at each of these steps
    t.lr_gamma = 0.1  # step decay factor
    t.bias_lr_factor = 1.0  # biases' updates times this (Detectron: 2, i.e. 2x learning rate)
    t.bias_weight_decay = True  # weight decay on biases too (torchvision) or not (Detectron)
    t.clip_grad_norm = 0.0  # > 0: clip gradients to this global norm (0 = off, as in the paper)
    t.seed = 0  # parameter init, RoI/anchor sampling, data order and flips
    t.init_checkpoint = ""  # converted torchvision checkpoint (detector, box-only detector or resnet backbone)
    # parts kept fixed: comma-separated backbone, rpn, box_head, mask_head, or detector (= the first three)
    t.freeze = ""
    t.verify_checkpoints = True  # check every loaded checkpoint's content hashes (init, resume, eval); False skips it
    # variables split over the mesh's data axis with their optimiser state (fsdp-style; see SHARDABLE_PARAMS):
    # "mask_mlp" = Mask^X's MLP-fusion FC (157 M parameters at R-50 size); "" = everything replicated
    t.shard_params = ""
    t.checkpoint_every = 5000  # save an orbax checkpoint every this many steps (and at the end)
    t.keep_checkpoints = 3  # checkpoints kept in WORKDIR/checkpoints
    t.log_every = 20  # TensorBoard scalars every this many steps
    # non-finite loss: stop (name the step, keep the last good checkpoint) | skip (drop that update, count it)
    t.on_nonfinite = "stop"

    c.eval = e = ml_collections.ConfigDict()
    e.batch_size = 8  # evaluation batch (global)
    e.max_images = 0  # 0 = the whole validation set
    e.num_pictures = 8  # prediction PNGs written after evaluation
    e.picture_score_thresh = 0.5  # detections drawn in those pictures: score at least this
    e.tb_images_every = 0  # training: predictions on tb_num_images val images to TensorBoard every N steps (0 = off)
    e.tb_num_images = 4  # validation images shown in TensorBoard (the same ones every time)

    c.lock()
    return c


# Training recipes: the keys where torchvision's detection reference and Detectron (the code the
# Mask^X paper trained with: ronghanghu/seg_every_thing) differ. Configs choose one with apply_recipe;
# the schedule's length, learning rate and decay steps stay each config's own.
RECIPES: dict[str, dict[str, object]] = {
    "torchvision": {
        "model.box_predictor_init": "torch",
        "model.box_reg_beta": 1.0 / 9,
        "model.binarize_mask_targets": False,
        "train.bias_lr_factor": 1.0,
        "train.bias_weight_decay": True,
        "train.warmup_steps": 1000,
        "train.warmup_factor": 0.001,
    },
    "detectron": {  # lib/core/config.py, lib/modeling/{optimizer,fast_rcnn_heads}.py, lib/roi_data/mask_rcnn.py
        "model.box_predictor_init": "detectron",
        "model.box_reg_beta": 1.0,
        "model.binarize_mask_targets": True,
        "train.bias_lr_factor": 2.0,
        "train.bias_weight_decay": False,
        "train.warmup_steps": 500,
        "train.warmup_factor": 1.0 / 3,
    },
}


def apply_overrides(c: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]) -> ml_collections.ConfigDict:
    """Apply ``[("section.key", "text"), ...]`` (``--config.section.key=text`` on a command line) to ``c`` in place.

    The text is read as the key's current type: a string as it is, a bool from true/false/1/0, numbers and
    tuples as Python literals. Raises ValueError naming an unknown key or a value of the wrong type.
    """
    import ast

    for key, text in overrides:
        parts = key.split(".")
        node = c
        try:
            for p in parts[:-1]:
                node = node[p]
            current = node[parts[-1]]
        except (KeyError, AttributeError):
            raise ValueError(f"unknown config key {key!r}; every key is listed in maskx_jax/config.py") from None
        if isinstance(current, str):
            value = text
        elif isinstance(current, bool):
            if text.strip().lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--config.{key}={text}: expected true or false")
            value = text.strip().lower() in ("true", "1")
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"--config.{key}={text}: not a {type(current).__name__}") from None
            if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            if type(value) is not type(current):
                raise ValueError(f"--config.{key}={text}: expected a {type(current).__name__}")
        node[parts[-1]] = value
    return c


def apply_recipe(c: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """Set every key of ``RECIPES[name]`` in ``c`` (in place; returned for chaining).

    A config file calls this once, then overrides what it must (a CPU demo's shorter warmup, say);
    on the command line each key stays overridable on its own.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    for key, value in RECIPES[name].items():
        section, leaf = key.split(".")
        c[section][leaf] = value
    return c


def recipe_of(c: ml_collections.ConfigDict) -> str:
    """The name of the recipe whose every key ``c`` has, or ``'custom'``."""
    for name, values in RECIPES.items():
        if all(c[key.split(".")[0]][key.split(".")[1]] == v for key, v in values.items()):
            return name
    return "custom"


def shard_parts(text: str) -> list[str]:
    """``train.shard_params`` as a list of name parts: "mask_mlp, x" -> ["mask_mlp", "x"]; "" -> []."""
    return [p.strip() for p in str(text).split(",") if p.strip()]


def validate(c: ml_collections.ConfigDict) -> None:
    """Check options against each other; raise one ValueError listing every problem.

    Every check that needs only the config is here. The one place that checks the config against the
    hardware (the batch against the mesh's devices and the processes) is
    :func:`maskx_jax.train.config_checks.check_scaling`. ``train_lib.train`` and ``Trainer`` call both.
    """
    errors = []

    def check(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)

    m, d, t = c.model, c.data, c.train
    check(m.depth in (18, 34, 50, 101), f"model.depth must be 18, 34, 50 or 101, got {m.depth}")
    check(m.norm in NORMS, f"model.norm must be one of {NORMS}, got {m.norm!r}")
    check(m.mask_mode in MASK_MODES, f"model.mask_mode must be one of {MASK_MODES}, got {m.mask_mode!r}")
    check(m.transfer_input in TRANSFER_INPUTS,
          f"model.transfer_input must be one of {TRANSFER_INPUTS}, got {m.transfer_input!r}")
    check(m.transfer_layers in (1, 2, 3), f"model.transfer_layers must be 1, 2 or 3, got {m.transfer_layers}")
    check(m.transfer_activation in ACTIVATIONS, f"model.transfer_activation must be one of {ACTIVATIONS}")
    check(m.box_predictor_init in BOX_PREDICTOR_INITS,
          f"model.box_predictor_init must be one of {BOX_PREDICTOR_INITS}, got {m.box_predictor_init!r}")
    check(m.box_reg_beta > 0, f"model.box_reg_beta must be > 0, got {m.box_reg_beta}")
    check(t.bias_lr_factor > 0, f"train.bias_lr_factor must be > 0, got {t.bias_lr_factor}")
    check(m.transfer_hidden == m.mask_head_channels or m.mask_mode != "transfer",
          "model.transfer_hidden must equal model.mask_head_channels (tau outputs 1x1 conv weights on those features)")
    check(m.dtype in COMPUTE_DTYPES, f"model.dtype must be one of {COMPUTE_DTYPES}")
    check(m.conv_impl in CONV_IMPLS, f"model.conv_impl must be one of {CONV_IMPLS}, got {m.conv_impl!r}")
    check(m.sampling_ratio >= 1, "model.sampling_ratio must be >= 1 (adaptive sampling has no static shape)")
    check(0 <= m.freeze_at <= 5, "model.freeze_at must be in [0, 5]")
    check(0 < m.roi_positive_fraction <= 1 and 0 < m.rpn_positive_fraction <= 1, "positive fractions must be in (0, 1]")
    check(d.source in SOURCES, f"data.source must be one of {SOURCES}, got {d.source!r}")
    check(d.pad_height % 32 == 0 and d.pad_width % 32 == 0, "data.pad_height / pad_width must be multiples of 32")
    check(d.mask_supervision in MASK_SUPERVISION, f"data.mask_supervision must be one of {MASK_SUPERVISION}")
    check(d.mask_supervision != "by_annotation" or d.set_a.strip() == "",
          "data.set_a must be empty with data.mask_supervision=by_annotation (set A is then the classes that have a "
          "mask annotation in the training data)")
    check(d.synthetic_variant in SYNTHETIC_VARIANTS,
          f"data.synthetic_variant must be one of {SYNTHETIC_VARIANTS}, got {d.synthetic_variant!r}")
    check(not d.synthetic_mask_fraction.strip() or d.source == "synthetic",
          "data.synthetic_mask_fraction only applies to data.source=synthetic")
    check(d.box_source in BOX_SOURCES, f"data.box_source must be one of {BOX_SOURCES}, got {d.box_source!r}")
    if d.box_source:
        check(d.source in ("synthetic", "coco"),
              "data.box_source needs data.source=synthetic or coco (the mask source)")
        check(d.box_source != "coco" or bool(d.box_source_json and d.box_source_images),
              "data.box_source=coco needs data.box_source_json and data.box_source_images")
        check(0.0 < d.box_source_fraction < 1.0,
              f"data.box_source_fraction must be in (0, 1), got {d.box_source_fraction}")
        check(d.box_source_unmatched in UNMATCHED_POLICIES,
              f"data.box_source_unmatched must be one of {UNMATCHED_POLICIES}, got {d.box_source_unmatched!r}")
    else:
        check(not (d.box_source_json or d.box_source_images or d.box_source_class_map),
              "data.box_source_json / box_source_images / box_source_class_map are set but data.box_source is empty")
    check(d.source != "coco" or bool(d.train_json and d.train_images),
          "data.source=coco needs data.train_json and data.train_images")
    check(d.num_workers >= 0, f"data.num_workers must be >= 0 (0 = decode in this process), got {d.num_workers}")
    check(d.prefetch >= 1, f"data.prefetch must be >= 1, got {d.prefetch}")
    check(t.batch_size >= 1 and t.steps >= 1, "train.batch_size and train.steps must be >= 1")
    check(t.on_nonfinite in ON_NONFINITE, f"train.on_nonfinite must be one of {ON_NONFINITE}, got {t.on_nonfinite!r}")
    check(t.checkpoint_every >= 1 and t.log_every >= 1, "train.checkpoint_every and train.log_every must be >= 1")
    sharded = shard_parts(t.get("shard_params", ""))
    unknown = [p for p in sharded if p not in SHARDABLE_PARAMS]
    check(not unknown, f"train.shard_params: {unknown} cannot be sharded; allowed: {SHARDABLE_PARAMS} (each one's "
          "sharded step is tested equal to one device; others are not: see docs/scaling.md)")
    check("mask_mlp" not in sharded or (m.mlp_fusion and m.mask_mode != "none"),
          "train.shard_params=mask_mlp needs model.mlp_fusion=True (without it the model has no MLP-fusion FC)")
    # Tuple-valued keys: a command-line override can give them any shape, so check it here
    # rather than deep inside the model's tracing.
    def numbers(v, kind=(int, float)) -> bool:
        return isinstance(v, (tuple, list)) and all(
            isinstance(x, kind) and not isinstance(x, bool) and x > 0 for x in v)

    check(isinstance(m.anchor_sizes, (tuple, list)) and len(m.anchor_sizes) == 5
          and all(numbers(s) and len(s) >= 1 for s in m.anchor_sizes),
          f"model.anchor_sizes must be 5 non-empty tuples (P2..P6) of positive sizes, got {m.anchor_sizes!r}")
    check(numbers(m.aspect_ratios) and len(m.aspect_ratios) >= 1,
          f"model.aspect_ratios must be a non-empty tuple of positive numbers, got {m.aspect_ratios!r}")
    check(numbers(m.mask_slot_buckets, int) or m.mask_slot_buckets in ((), []),
          f"model.mask_slot_buckets must be a tuple of positive slot counts (or empty), got {m.mask_slot_buckets!r}")
    check(isinstance(m.mask_chunk_slots, int) and not isinstance(m.mask_chunk_slots, bool) and m.mask_chunk_slots >= 0,
          f"model.mask_chunk_slots must be an int >= 0 (0 = all slots at once), got {m.mask_chunk_slots!r}")
    lr_steps_ok = numbers(t.lr_steps, int) or len(t.lr_steps) == 0
    check(lr_steps_ok, f"train.lr_steps must be a tuple of positive step numbers, got {t.lr_steps!r}")
    check(not lr_steps_ok or list(t.lr_steps) == sorted(t.lr_steps), "train.lr_steps must be increasing")
    check(c.eval.tb_images_every >= 0 and c.eval.tb_num_images >= 1,
          "eval.tb_images_every must be >= 0 (0 = off) and eval.tb_num_images >= 1")
    check(t.optimizer in ("sgd", "adamw"), f"train.optimizer must be 'sgd' or 'adamw', got {t.optimizer!r}")
    try:
        frozen = optim.parse_freeze(t.freeze)
    except ValueError as e:
        frozen = ()
        errors.append(str(e))
    check(set(frozen) != set(optim.FREEZE_GROUPS), "train.freeze freezes every part of the model: nothing would train")
    check(not frozen or bool(t.init_checkpoint),
          f"train.freeze={t.freeze!r} keeps {', '.join(frozen) or 'those parts'} at their initial values: "
          "set train.init_checkpoint to the converted detector (or backbone) they should come from")
    check(m.mask_mode != "transfer" or d.set_a.strip() != "" or d.mask_supervision == "by_annotation",
          "model.mask_mode=transfer needs a non-empty data.set_a (or data.mask_supervision=by_annotation)")
    check(m.mask_mode != "none" or "mask_head" not in frozen,
          "train.freeze names mask_head, but model.mask_mode=none (a box-only detector) has no mask branch")
    if errors:
        raise ValueError("invalid config:\n" + "\n".join(f"  - {e}" for e in errors))
