"""active_chunk_sum: a sum over the first `count` chunks of a slot axis, with a hand-written backward pass that
recomputes each chunk; the value and gradients must be those of the plain sum over the same slots."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskx_jax.active_chunks import active_chunk_sum, chunks_needed, skip_is_safe


def _fn(diff, data, piece):
    """A non-linear function of the parameters, a feature map read at the slots' indices, and data."""
    w, feats = diff
    scale = data
    x, idx = piece  # [N, c, D] floats, [N, c] int rows of feats
    rows = feats[idx]  # [N, c, D]
    return jnp.sum(jnp.tanh(x @ w) * rows) * scale


def _inputs(n=2, k=7, d=3, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(d, d)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(5, d)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, k, d)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, 5, size=(n, k)), jnp.int32)
    return (w, feats), jnp.float32(1.5), (x, idx)


@pytest.mark.parametrize("chunk, count", [(3, 3), (3, 2), (3, 0), (7, 1), (2, 4)])
def test_sum_and_gradients_are_those_of_the_needed_slots(chunk, count):
    """Chunks at or after ``count`` are skipped (their slots here are not zero: a chunk that ran would change
    the sum); the first ``min(count * chunk, K)`` slots give the value and both gradients."""
    diff, data, slots = _inputs()
    used = min(count * chunk, slots[0].shape[1])

    def chunked(diff):
        return active_chunk_sum(_fn, chunk, diff, data, slots, jnp.int32(count))

    def direct(diff):
        return _fn(diff, data, tuple(s[:, :used] for s in slots))

    value, grads = jax.jit(jax.value_and_grad(chunked))(diff)
    want, want_grads = jax.value_and_grad(direct)(diff)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5, atol=1e-6)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
    if count == 0:
        assert float(value) == 0 and all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_no_count_runs_every_chunk():
    """count=None (several CPU processes, ``skip_is_safe``): every chunk runs, no skip; the plain sum over all slots."""
    diff, data, slots = _inputs()
    value, grads = jax.jit(jax.value_and_grad(lambda d: active_chunk_sum(_fn, 3, d, data, slots, None)))(diff)
    want, want_grads = jax.value_and_grad(lambda d: _fn(d, data, slots))(diff)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5, atol=1e-6)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert skip_is_safe()  # one process here


def test_one_compiled_copy_in_a_static_loop():
    """The chunk function is traced into one loop body for the forward pass and one for the backward pass,
    whatever the count: a loop over every chunk (static trip count) whose body skips the chunks at or after the
    count, no switch over counts."""
    diff, data, slots = _inputs()
    calls = []

    def counting(diff, data, piece):
        calls.append(piece[0].shape)
        return _fn(diff, data, piece)

    grad = jax.grad(lambda d, c: active_chunk_sum(counting, 3, d, data, slots, c))
    jaxpr = str(jax.make_jaxpr(grad)(diff, jnp.int32(2)))
    assert "while[" in jaxpr or "scan[" in jaxpr
    assert jaxpr.count("cond[") == 2  # the skip, once in each loop
    assert calls and all(shape == (2, 3, 3) for shape in calls)
    assert len(calls) <= 3  # forward loop, recomputation in the backward loop (+ an abstract trace)


@pytest.mark.parametrize("counts, chunk, expected", [((0, 0), 4, 0), ((3, 1), 4, 1), ((4, 0), 4, 1),
                                                     ((5, 2), 4, 2), ((8, 8), 4, 2), ((9, 0), 8, 2)])
def test_chunks_needed_holds_the_largest_count(counts, chunk, expected):
    used = np.zeros((len(counts), 12), bool)
    for i, c in enumerate(counts):
        used[i, :c] = True
    assert int(chunks_needed(jnp.asarray(used), chunk)) == expected
