"""The compiled pieces of one experiment on one mesh: init, train step and predict, with explicit shardings.

The train state is replicated over the mesh's ``data`` axis, except the variables ``train.shard_params`` names,
which are split over it with their optimiser state (:meth:`Trainer._state_shardings`); batches are sharded on
their leading axis. Each process loads its own
``1/process_count`` slice of the global batch and :func:`jax.make_array_from_process_local_data` assembles it.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskx_jax.config import shard_parts, validate
from maskx_jax.host_memory import release_host_memory
from maskx_jax.optim import make_optimizer, make_schedule, skipped_losses, trainable_filter
from maskx_jax.state_utils import key_path_name
from maskx_jax.train.config_checks import check_scaling
from maskx_jax.train.distributed import DATA_AXIS, create_mesh
from maskx_jax.train.step import TrainState, make_train_step
from maskx_jax.types import Batch, Detections

# (config, num_classes, seed) -> model; seed is ``jax.random.key(train.seed)``, traced inside the jitted init
# (``nnx.Rngs`` takes it as it takes an int, with the same streams).
ModelFn = Callable[[ml_collections.ConfigDict, int, Any], nnx.Module]


def _default_model_fn(config: ml_collections.ConfigDict, num_classes: int, seed: Any) -> nnx.Module:
    from maskx_jax.model_builder import build_model

    return build_model(config, num_classes, seed=seed)


def _signature(*trees: Any) -> tuple:
    """What a compiled program is specific to: the tree structure and each leaf's abstract value (shape, dtype,
    weak type) and sharding."""
    leaves, treedef = jax.tree.flatten(trees)
    return treedef, tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


class _SeededStep:
    """The jitted ``(state, batch, seed)`` step seen as ``(state, batch)``, with ``lower`` for AOT use.

    After :meth:`compile`, calls with arguments of the compiled signature (structure, shapes, dtypes, shardings)
    run that compiled program directly; others go through ``jax.jit`` as before (tracing and compiling anew).
    """

    def __init__(self, jitted: Any, seed: np.ndarray):
        self.jitted = jitted
        self.seed = seed
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, state: Any, batch: Batch) -> tuple[Any, dict]:
        compiled = self._compiled.get(_signature(state, batch)) if self._compiled else None
        if compiled is not None:
            return compiled(state, batch, self.seed)
        return self.jitted(state, batch, self.seed)

    def lower(self, state: Any, batch: Any) -> Any:
        return self.jitted.lower(state, batch, self.seed)

    def compile(self, state: Any, batch: Any) -> Any:
        """Compile the step for these (abstract or concrete) arguments ahead of its first call and keep the
        program (a later ``compile`` with the same signature returns it), then free what the compile leaves
        in host memory so that the step's buffers do not sit on top of it: JAX's own caches of this function
        (its trace and lowering; the kept program does not need them) and the compiler's freed pages
        (``host_memory.release_host_memory``). See docs/performance.md.

        Returns the ``jax.stages.Compiled`` step (its ``memory_analysis()`` / ``cost_analysis()``), called as
        ``compiled(state, batch, self.seed)``."""
        key = _signature(state, batch)
        if key in self._compiled:
            return self._compiled[key]
        t0 = time.perf_counter()
        compiled = self._compiled[key] = self.lower(state, batch).compile()
        self.jitted.clear_cache()
        released = release_host_memory()
        freed = "" if released is None else f"; host memory released: RSS {released[0]:.0f} -> {released[1]:.0f} MiB"
        logging.info("training step compiled in %.1f s%s", time.perf_counter() - t0, freed)
        return compiled


class Trainer:
    """The compiled pieces of one experiment on one mesh: init, train step and predict.

    Args:
      config: the full config (``model``, ``train`` sections are read).
      num_classes: number of classes including the background.
      model_fn: ``(config, num_classes, seed) -> nnx.Module`` with ``losses(batch, rng)`` and
        ``predict(images, image_sizes)``; defaults to ``model_builder.build_model``. ``seed`` is a PRNG
        key (give it to ``nnx.Rngs``).
      mesh: defaults to :func:`create_mesh` over every device.

    ``train.seed`` is an argument of the compiled init and step, not a constant in them: runs that differ
    only in the seed share one compiled program (JAX's persistent compilation cache finds it).
    """

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int, *, model_fn: ModelFn | None = None,
                 mesh: Mesh | None = None):
        self.config = config
        self.num_classes = num_classes
        self.model_fn = model_fn or _default_model_fn
        self.mesh = mesh or create_mesh()
        validate(config)
        check_scaling(config, self.mesh)
        t = config.train
        self.freeze = str(t.get("freeze", ""))
        self.verify_checkpoints = bool(t.get("verify_checkpoints", True))
        self.tx = make_optimizer(t)
        self.schedule = make_schedule(t)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

        graphdefs = []

        def init(seed: jax.Array) -> TrainState:
            model = self.model_fn(config, num_classes, jax.random.key(seed))
            # Frozen parts go to ``rest``: the step differentiates only ``params``, so JAX computes no
            # backward pass into them and the optimiser holds no state (and applies no decay) for them.
            graphdef, params, rest = nnx.split(model, trainable_filter(self.freeze), ...)
            graphdefs.append(graphdef)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), rest=rest,
                              skipped=jnp.zeros((), jnp.int32), halted_at=jnp.full((), -1, jnp.int32))

        # Trace once without computing anything: shapes for the shardings and the graph definition.
        self._seed = np.int32(t.seed)
        shapes = jax.eval_shape(init, jax.ShapeDtypeStruct((), jnp.int32))
        self.graphdef = graphdefs[-1]
        self.state_shardings = self._state_shardings(shapes)
        self._abstract_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings)
        # Parameters are created directly with their sharding (no host copy, no device-0 detour).
        self._init = jax.jit(init, in_shardings=self.replicated, out_shardings=self.state_shardings)
        self.skip_losses = skipped_losses(self.freeze)
        step_fn = make_train_step(self.graphdef, self.tx, self.schedule, int(t.seed), t.on_nonfinite,
                                  self.skip_losses)
        self.train_step = _SeededStep(
            jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
                    out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,)), self._seed)

        graphdef = self.graphdef

        def predict(params, rest, images, image_sizes) -> Detections:
            return nnx.merge(graphdef, params, rest).predict(images, image_sizes)

        self._predict = jax.jit(predict)

    def _state_shardings(self, shapes: TrainState) -> TrainState:
        """Replicated, except the variables ``train.shard_params`` names (and their optimiser state, whose
        paths contain the same name): each such array is split over the ``data`` axis on its first dimension
        divisible by the device count (fsdp-style: a device holds 1/N of it; XLA gathers it inside the step and
        reduce-scatters its gradient). One with no such dimension (a small bias) stays replicated.

        Raises:
          ValueError: a ``train.shard_params`` part names no variable of this model (e.g. ``mask_mlp`` without
            ``model.mlp_fusion``).
        """
        parts = shard_parts(self.config.train.get("shard_params", ""))
        used: set[str] = set()

        def sharding(path, leaf) -> NamedSharding:
            name = key_path_name(path)
            matching = [p for p in parts if p in name]
            if not matching or not leaf.shape:
                return self.replicated
            used.update(matching)
            for dim, size in enumerate(leaf.shape):
                if size % self.mesh.size == 0:
                    return NamedSharding(self.mesh, P(*([None] * dim), DATA_AXIS))
            return self.replicated

        shardings = jax.tree_util.tree_map_with_path(sharding, shapes)
        unused = [p for p in parts if p not in used]
        if unused:
            raise ValueError(f"train.shard_params names {unused}, which match no variable of this model "
                             "(mask_mlp needs model.mlp_fusion=True)")
        return shardings

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
        return self._abstract_state

    def init_state(self) -> TrainState:
        return self._init(self._seed)

    def release_init(self) -> None:
        """Drop the compiled init program and JAX's trace of it, and hand the freed host memory back
        (docs/performance.md): the training loop does this once the state exists, when the trainer is its own. A
        later :meth:`init_state` compiles the init again."""
        self._init.clear_cache()
        release_host_memory()

    def global_batch(self, local: Batch) -> Batch:
        """Process-local NumPy batch (``batch_size / process_count`` images) -> global sharded arrays."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)), local)

    def param_count(self, state: TrainState) -> tuple[int, int]:
        """(trainable, frozen) scalar counts."""
        count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
        return count(state.params), count(state.rest)
    # ----------------------------------------------------------------------- init checkpoint

    def load_init_checkpoint(self, state: TrainState, directory: str) -> tuple[TrainState, dict]:
        """:func:`maskx_jax.train.init_checkpoint.load_init_checkpoint` into this trainer's state."""
        from maskx_jax.train.init_checkpoint import load_init_checkpoint

        return load_init_checkpoint(self, state, directory)

    # ----------------------------------------------------------------------- inference

    def make_predict_fn(self, state: TrainState) -> Callable[[Any, Any], Detections]:
        """``(images [B, H, W, 3], image_sizes [B, 2]) -> host NumPy Detections`` with ``state``'s weights, data
        parallel over the mesh (:func:`maskx_jax.parallel_predict.data_parallel`)."""
        from maskx_jax.parallel_predict import data_parallel

        params, rest = state.params, state.rest
        return data_parallel(lambda images, sizes: self._predict(params, rest, images, sizes), self.mesh)
