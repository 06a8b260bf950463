"""A sum over the chunks of a slot axis that hold work, one chunk at a time, with a backward pass that
recomputes each chunk and keeps nothing between chunks.

The mask branch of the training step (``MaskRCNN._mask_loss``) has a static number of slots per image (128)
of which often only a few are supervised (moved to the front). :func:`active_chunk_sum` runs a function on
``chunk`` slots of every image at a time in a loop over the chunks, whose body runs ``fn`` only for the first
``count`` chunks (``count`` computed inside the step, :func:`chunks_needed`; the other iterations are a
``lax.cond`` that passes the running total through): the skipped chunks cost next to nothing, one compiled
copy of the function serves every count, and only one chunk's activations are alive at a time. The trip
count itself is static: with a traced one, two CPU processes (gloo collectives, which pair up in issue order)
fell out of step inside the step (tests/integration/test_many_hosts.py). JAX would differentiate the
``lax.cond`` by saving zero-filled residuals for every skipped chunk, so the gradient is written out
(``jax.custom_vjp``): the backward loop recomputes each needed chunk's forward pass inside ``jax.vjp`` and adds
its cotangents to the running total, kept in the dtype of ``diff`` (float32 parameters: a float32 sum even
when ``fn`` computes in bfloat16). The result equals ``fn`` over every slot at once up to float summation
order, provided ``fn`` gives 0 (and zero gradients) for slots without work.

Conventions: every array of ``slots`` is [N, K, ...] (images, slots); ``fn(diff, data, piece)`` takes one
chunk, arrays [N, chunk, ...], and returns a float32 scalar. ``diff`` is differentiated; ``data`` (and the
slots) are not: their cotangents are zero.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
ChunkFn = Callable[[Any, Any, tuple[Array, ...]], Array]


def chunks_needed(used: Array, chunk: int) -> Array:
    """How many chunks of ``chunk`` slots hold every image's used slots: ``ceil(max_i sum_j used[i, j] / chunk)``.

    used: [N, K] bool, the used slots of each image at the front. int32 scalar; under data parallelism the
    max runs over the global batch (one all-reduce), so every device runs the same chunks."""
    need = jnp.max(jnp.sum(used, axis=1)).astype(jnp.int32)
    return (need + chunk - 1) // chunk


def skip_is_safe() -> bool:
    """Whether the loop may skip chunks. Not with several CPU processes: gloo pairs collectives in the order each
    process issues them, and with the skip two processes fell out of step inside the step (a collective mismatch
    with a traced trip count, a hang with the skip, in tests/integration/test_many_hosts.py); they then run every
    chunk, as the ``lax.map`` before them did. Single-process meshes and accelerators skip."""
    return jax.process_count() == 1 or jax.default_backend() != "cpu"


def _chunked(slots: tuple[Array, ...], chunk: int) -> tuple[Array, ...]:
    """[N, K, ...] -> [N, ceil(K / chunk), chunk, ...], the last chunk padded with zeros."""
    def split(x: Array) -> Array:
        n_chunks = -(-x.shape[1] // chunk)
        x = jnp.pad(x, [(0, 0), (0, n_chunks * chunk - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:])
    return tuple(split(x) for x in slots)


def _piece(chunks: tuple[Array, ...], i: Array) -> tuple[Array, ...]:
    return tuple(jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False) for x in chunks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def active_chunk_sum(fn: ChunkFn, chunk: int, diff: Any, data: Any, slots: tuple[Array, ...],
                     count: Array | None) -> Array:
    """``sum_{j < count} fn(diff, data, slots[:, j*chunk:(j+1)*chunk])``, one chunk after the other.

    fn: a pure function (no closed-over traced values: pass them in ``diff`` or ``data``).
    chunk: static slots per image per chunk (> 0). count: int32 scalar, at most ``ceil(K / chunk)`` (e.g.
    :func:`chunks_needed`), or None: every chunk, no skip (see :func:`skip_is_safe`). Returns a float32 scalar;
    gradients flow to ``diff`` only.
    """
    return _forward(fn, chunk, diff, data, slots, count)


def _over_chunks(n_chunks: int, count: Array | None, add: Callable[[Array, Any], Any], init: Any) -> Any:
    """``add(i, total)`` for chunk i = 0 .. n_chunks - 1, skipped (total passed through) for i >= count; a static
    trip count, so that every process issues the same collectives (see :func:`skip_is_safe`)."""
    def body(i: Array, total: Any) -> Any:
        step = lambda t: add(i, t)
        return step(total) if count is None else jax.lax.cond(i < count, step, lambda t: t, total)
    return jax.lax.fori_loop(0, n_chunks, body, init)


def _forward(fn: ChunkFn, chunk: int, diff: Any, data: Any, slots: tuple[Array, ...], count: Array | None) -> Array:
    chunks = _chunked(slots, chunk)
    add = lambda i, total: total + fn(diff, data, _piece(chunks, i)).astype(jnp.float32)
    return _over_chunks(chunks[0].shape[1], count, add, jnp.zeros((), jnp.float32))


def _fwd(fn: ChunkFn, chunk: int, diff: Any, data: Any, slots: tuple[Array, ...], count: Array | None):
    # The residuals are the inputs themselves: nothing of a chunk's forward pass is kept.
    return _forward(fn, chunk, diff, data, slots, count), (diff, data, slots, count)


def _bwd(fn: ChunkFn, chunk: int, residuals, g: Array):
    diff, data, slots, count = residuals
    chunks = _chunked(slots, chunk)

    def add(i: Array, total: Any) -> Any:
        _, vjp = jax.vjp(lambda d: fn(d, data, _piece(chunks, i)).astype(jnp.float32), diff)
        (ct,) = vjp(g)
        return jax.tree.map(jnp.add, total, ct)

    ct_diff = _over_chunks(chunks[0].shape[1], count, add, jax.tree.map(jnp.zeros_like, diff))
    return ct_diff, None, None, None


active_chunk_sum.defvjp(_fwd, _bwd)
