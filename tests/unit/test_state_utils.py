"""The one path -> name spelling (state_utils): variable paths and jax key paths over a training state name a
leaf alike, as the checkpoints' hash records and the shard_params rule rely on."""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from maskx_jax.state_utils import flat_variables, key_path_name, name_path, named_leaves, path_name
from maskx_jax.train.step import TrainState


class _Tiny(nnx.Module):
    def __init__(self):
        self.head = nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1))])


def test_path_name_round_trip():
    path = ("backbone", "body", "layer1", 0, "conv1", "kernel")
    assert path_name(path) == "backbone.body.layer1.0.conv1.kernel"
    assert name_path(path_name(path)) == path


def test_named_leaves_spelling_is_pinned():
    """A state with attribute keys, NNX variables (their ``.value`` dropped), list indices and optax's named
    tuples; the plain dict a checkpoint restores (list indices as string keys) names every leaf the same."""
    model = _Tiny()
    params = nnx.state(model)
    tx = optax.sgd(0.1, momentum=0.9)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=tx.init(params), rest={}, skipped=zero, halted_at=zero)
    names = named_leaves(state)
    assert "params.head.0.kernel" in names and "params.head.1.bias" in names
    assert "opt_state.0.trace.head.0.kernel" in names
    assert "step" in names
    assert not any(n.endswith(".value") for n in names)
    # Variable paths and key paths agree on the parameters' names.
    assert {"params." + path_name(p) for p in flat_variables(model)} <= set(names)
    restored = {"params": {"head": {"0": {"kernel": 0 * jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}}
    assert set(named_leaves(restored)) == {"params.head.0.kernel", "params.head.0.bias"}


def test_key_path_name_of_one_leaf():
    import jax

    [(kp, _)] = jax.tree_util.tree_flatten_with_path({"a": [None, {"b": jnp.ones(1)}]})[0]
    assert key_path_name(kp) == "a.1.b"
