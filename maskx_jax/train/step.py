"""The train state and the pure train step ``(state, batch) -> (state, metrics)``.

Non-finite losses. The step checks the total loss and the gradient norm; when either is not finite the update
is dropped inside the step (parameters and optimiser state stay as they were) and counted (``skipped``) or
recorded (``halted_at``), as ``train.on_nonfinite`` says; the host loop (``loop.py``) then stops or goes on.
The step's randomness is ``fold_in(PRNGKey(train.seed), step)``, with ``step`` read from the state.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from maskx_jax.types import Batch

Array = jax.Array


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, checkpointed as a whole.

    step:      int32 scalar, the number of completed steps (the next step's index).
    params:    ``nnx.State`` of the trainable ``nnx.Param`` variables (what the optimiser sees): every
               ``nnx.Param`` outside the ``train.freeze`` parts (see ``optim.trainable_filter``).
    opt_state: optax state of ``params`` (nothing for frozen variables: they are not in ``params``).
    rest:      ``nnx.State`` of every other variable (FrozenBN buffers, ``model.freeze_at`` stages, the
               ``train.freeze`` parts), never updated and never differentiated.
    skipped:   int32 scalar, steps whose update was dropped for a non-finite loss (``on_nonfinite='skip'``).
    halted_at: int32 scalar, the first non-finite step under ``on_nonfinite='stop'`` (-1 if none); once
               set, no later step changes params or opt_state.
    """

    step: Array
    params: Any
    opt_state: Any
    rest: Any
    skipped: Array
    halted_at: Array


def _tree_select(pred: Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    seed: int, on_nonfinite: str, skip_losses: tuple[str, ...] = ()
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """The pure train step ``(state, batch, seed=seed) -> (state, metrics)``.

    ``seed`` may be passed as a (traced) int32 scalar instead of baked in: the :class:`Trainer` does, so
    one compiled step serves every ``train.seed`` (a seed sweep compiles once, through the persistent
    compilation cache). The step's key is ``fold_in(PRNGKey(seed), state.step)`` either way.

    ``skip_losses``: loss groups the model does not compute (``MaskRCNN.losses(skip=...)``; see
    ``optim.skipped_losses``: the losses of frozen parts).

    metrics: ``losses`` {name: scalar} as returned by ``model.losses``, ``total``, ``lr`` (of this
    step), ``grad_norm`` (global L2 norm of the gradients), ``nonfinite`` (bool: this step's update
    was dropped), ``skipped`` (running count) and ``step`` (this step's index).
    """
    stop_mode = on_nonfinite == "stop"

    def train_step(state: TrainState, batch: Batch, seed: Array | int = seed) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.rest)
            if skip_losses:
                return model.losses(batch, rng, skip=skip_losses)
            return model.losses(batch, rng)

        (total, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        apply = finite & (state.halted_at < 0) if stop_mode else finite
        halted_at = state.halted_at
        skipped = state.skipped
        if stop_mode:
            halted_at = jnp.where(~finite & (halted_at < 0), state.step, halted_at)
        else:
            skipped = skipped + (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=_tree_select(apply, new_params, state.params),
            opt_state=_tree_select(apply, new_opt_state, state.opt_state),
            skipped=skipped,
            halted_at=halted_at,
        )
        metrics = {
            "losses": losses,
            "total": total,
            "lr": schedule(state.step),
            "grad_norm": grad_norm,
            "nonfinite": ~finite,
            "skipped": skipped,
            "step": state.step,
        }
        return new_state, metrics

    return train_step
