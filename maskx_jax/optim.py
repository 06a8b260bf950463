"""Optimiser and learning-rate schedule, matching torchvision's detection reference recipe.

torchvision ``references/detection/train.py`` trains Mask R-CNN with
``torch.optim.SGD(params, lr, momentum, weight_decay)`` and a linear warmup
(``LinearLR(start_factor=warmup_factor, total_iters=warmup_iters)``) chained with
``MultiStepLR(milestones=lr_steps, gamma=lr_gamma)``. Both are reproduced here:

  * torch's SGD adds ``weight_decay * param`` to the gradient *before* the momentum buffer
    (``d_p = grad + wd * p``; ``buf = momentum * buf + d_p``; ``p -= lr * buf``), which is
    ``optax.add_decayed_weights`` followed by ``optax.sgd`` (optax's ``trace`` is the same
    undampened, non-Nesterov buffer, and the learning rate multiplies the buffer afterwards, as torch).
  * lr(step) = lr * warmup(step) * gamma ** (number of lr_steps <= step), with
    warmup(step) = warmup_factor + (1 - warmup_factor) * step / warmup_steps for step < warmup_steps
    and 1 afterwards (the step decay also applies inside the warmup, as chained torch schedulers do).

Detectron's recipe (what Mask^X was trained with, seg_every_thing ``lib/modeling/optimizer.py``) treats
biases apart: no weight decay, and their gradient doubled (2x the learning rate under SGD).
``train.bias_weight_decay`` and ``train.bias_lr_factor`` express that; the factor multiplies each bias's
update after the optimiser, which for SGD equals scaling its gradient (the update is linear in it) and
for AdamW, which is invariant to gradient scale, is the only way to give biases a higher rate.

Only the trainable ``nnx.Param`` variables may be given to the optimiser (see ``train_lib``):
weight decay would otherwise shrink frozen buffers. :func:`trainable_filter` decides which those
are: every ``nnx.Param`` outside the module groups named by ``train.freeze`` (stage-wise training,
e.g. Mask^X on a frozen, already trained box detector). Frozen parameters are kept out of the
optimiser's pytree altogether, not masked inside it, so they get no gradient, no weight decay and
no optimiser state (torch's ``requires_grad=False`` + leaving them out of ``SGD(params)``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from maskx_jax.state_utils import variable_path

# train.freeze groups -> the module paths (prefixes of NNX variable paths, torchvision's names) they hold.
FREEZE_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "backbone": (("backbone",),),  # ResNet body and FPN
    "rpn": (("rpn",),),
    "box_head": (("roi_heads", "box_head"), ("roi_heads", "box_predictor")),  # fc6/fc7, cls_score/bbox_pred
    # mask convs, conv5_mask, mask_fcn_logits / MLP fusion, and tau (Mask^X)
    "mask_head": (("roi_heads", "mask_head"), ("roi_heads", "mask_predictor"), ("roi_heads", "weight_transfer")),
}
# Shorthands: ``detector`` is everything a box detector (Faster R-CNN) has, i.e. stage-wise Mask^X.
FREEZE_PRESETS: dict[str, tuple[str, ...]] = {"detector": ("backbone", "rpn", "box_head")}


def parse_freeze(spec: str) -> tuple[str, ...]:
    """``train.freeze`` -> sorted group names.

    Args:
      spec: ``""`` (freeze nothing beyond ``model.freeze_at``), a comma-separated list of
        :data:`FREEZE_GROUPS` names, or a :data:`FREEZE_PRESETS` name (``detector``); they may mix.
    Raises:
      ValueError: a name that is neither a group nor a preset (one line naming the valid ones).
    """
    groups: set[str] = set()
    for name in (part.strip() for part in str(spec).split(",")):
        if not name:
            continue
        if name in FREEZE_PRESETS:
            groups.update(FREEZE_PRESETS[name])
        elif name in FREEZE_GROUPS:
            groups.add(name)
        else:
            raise ValueError(f"train.freeze: unknown part {name!r}; use a comma-separated list of "
                             f"{', '.join(FREEZE_GROUPS)} or the preset 'detector' (= backbone,rpn,box_head)")
    return tuple(sorted(groups))


def is_frozen(path: tuple, groups: tuple[str, ...]) -> bool:
    """Whether the variable at NNX ``path`` (e.g. ``('roi_heads', 'box_head', 'fc6', 'kernel')``)
    belongs to one of the frozen ``groups``."""
    return any(tuple(path[:len(prefix)]) == prefix for g in groups for prefix in FREEZE_GROUPS[g])


def trainable_filter(spec: str) -> Callable[[tuple, Any], bool]:
    """An NNX filter ``(path, variable) -> bool`` selecting the trainable variables: every
    ``nnx.Param`` not in a ``train.freeze`` group (FrozenBN buffers and ``model.freeze_at``
    stages are never ``nnx.Param``). Use as ``nnx.split(model, trainable_filter(spec), ...)``."""
    groups = parse_freeze(spec)

    def trainable(path: tuple, variable: Any) -> bool:
        return isinstance(variable, nnx.Param) and not is_frozen(path, groups)

    return trainable


def skipped_losses(spec: str) -> tuple[str, ...]:
    """The ``MaskRCNN.losses`` groups that cannot train anything under ``train.freeze=spec``.

    A loss group trains its own part and, through the features, the backbone; once both are frozen it
    is skipped (no anchor sampling, no box head forward pass): e.g. ``detector`` skips 'rpn' and
    'box', leaving only the mask loss of stage-wise Mask^X.
    """
    groups = set(parse_freeze(spec))
    own = {"rpn": "rpn", "box": "box_head", "mask": "mask_head"}
    return tuple(loss for loss, part in own.items() if {"backbone", part} <= groups)


def is_bias(path: tuple) -> bool:
    """Whether the variable at NNX ``path`` is a bias (its last name is ``bias``; normalisation shifts too)."""
    return bool(path) and path[-1] == "bias"


def _bias_mask(params: Any, want_bias: bool) -> Any:
    """A pytree of bools like ``params``: True at the biases (``want_bias``) or at everything else."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: is_bias(variable_path(kp)) == want_bias, params)


def make_schedule(train_cfg: Any) -> optax.Schedule:
    """The learning rate as a function of the (0-based) step number.

    Args:
      train_cfg: the ``train`` section of the config (``lr``, ``warmup_steps``, ``warmup_factor``,
        ``lr_steps``, ``lr_gamma``).
    Returns:
      ``schedule(step) -> float32 scalar``; works on Python ints and traced int32 scalars alike.
    """
    base_lr = float(train_cfg.lr)
    warmup_steps = int(train_cfg.warmup_steps)
    warmup_factor = float(train_cfg.warmup_factor)
    milestones = tuple(int(s) for s in train_cfg.lr_steps)
    gamma = float(train_cfg.lr_gamma)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        if warmup_steps > 0:
            alpha = jnp.minimum(step, warmup_steps).astype(jnp.float32) / warmup_steps
            warm = warmup_factor * (1.0 - alpha) + alpha
        else:
            warm = jnp.float32(1.0)
        decays = sum((step >= m).astype(jnp.int32) for m in milestones) if milestones else jnp.int32(0)
        return (base_lr * warm * jnp.power(jnp.float32(gamma), decays.astype(jnp.float32))).astype(jnp.float32)

    return schedule


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
    """SGD with momentum and torch-style (coupled) weight decay under :func:`make_schedule`
    (``train.optimizer='sgd'``, the paper's), or AdamW with decoupled weight decay
    (``'adamw'``: converges much faster from scratch, used by the CPU-sized demo), after optional
    global-norm gradient clipping (``train.clip_grad_norm`` > 0). Biases are decayed only with
    ``train.bias_weight_decay`` and their updates multiplied by ``train.bias_lr_factor``.

    Args:
      train_cfg: the ``train`` section of the config (``momentum``, ``weight_decay``, the bias keys and
        the schedule keys).
    """
    parts = []
    clip = float(train_cfg.get("clip_grad_norm", 0.0))
    if clip > 0:
        # Global-norm clipping first: it bounds the rare huge gradients of from-scratch training.
        parts.append(optax.clip_by_global_norm(clip))
    decay_biases = bool(train_cfg.get("bias_weight_decay", True))
    decay_mask = None if decay_biases else (lambda params: _bias_mask(params, want_bias=False))
    bias_factor = float(train_cfg.get("bias_lr_factor", 1.0))
    kind = str(train_cfg.get("optimizer", "sgd"))
    wd = float(train_cfg.weight_decay)
    if kind == "adamw":
        parts.append(optax.adamw(make_schedule(train_cfg), weight_decay=wd, mask=decay_mask))
    elif kind == "sgd":
        if wd > 0:
            parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
        momentum = float(train_cfg.momentum)
        parts.append(optax.sgd(make_schedule(train_cfg), momentum=momentum if momentum > 0 else None))
    else:
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {kind!r}")
    if bias_factor != 1.0:
        parts.append(optax.masked(optax.scale(bias_factor), lambda params: _bias_mask(params, want_bias=True)))
    return optax.chain(*parts)
