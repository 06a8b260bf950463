"""A detector's ``predict`` spread over a device mesh: the batch is split over the ``data`` axis, the weights are
replicated, and every process gets the whole result back as host NumPy arrays.

One path for every caller that predicts on more than one device: training's evaluation
(:meth:`maskx_jax.train.trainer.Trainer.make_predict_fn`) and ``maskx_jax.predict`` on a work directory.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maskx_jax.train.distributed import DATA_AXIS
from maskx_jax.types import Detections

GlobalPredict = Callable[[jax.Array, jax.Array], Detections]


def data_parallel(predict: GlobalPredict, mesh: Mesh) -> Callable[[Any, Any], Detections]:
    """``predict`` (jitted, on global arrays) -> ``(images [B, H, W, 3], image_sizes [B, 2]) -> host Detections``.

    Every process passes the *whole* batch. It is sharded over ``mesh`` when B divides evenly, replicated
    otherwise (said once: every device then runs the whole batch), and every process gets the whole result.
    """
    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    replicated = NamedSharding(mesh, P())
    warned = []

    def run(images, image_sizes) -> Detections:
        images = np.asarray(images, np.float32)
        image_sizes = np.asarray(image_sizes, np.int32)
        sharding = batch_sharding if images.shape[0] % mesh.size == 0 else replicated
        if sharding is replicated and mesh.size > 1 and not warned:
            warned.append(True)
            logging.warning("a batch of %d images does not split over %d devices: every device runs the whole "
                            "batch (make eval.batch_size a multiple of the device count)", images.shape[0], mesh.size)
        put = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
        det = predict(put(images), put(image_sizes))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(det, tiled=True)
        return jax.device_get(det)

    return run


def model_predict_fn(model: nnx.Module, mesh: Mesh) -> Callable[[Any, Any], Detections]:
    """:func:`data_parallel` over ``model.predict`` with ``model``'s weights replicated on ``mesh``.

    The weights are an argument of the compiled function (not constants baked into it): one compile per input
    shape, whatever the weights.
    """
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    compiled = jax.jit(lambda state, images, sizes: nnx.merge(graphdef, state).predict(images, sizes))
    return data_parallel(lambda images, sizes: compiled(state, images, sizes), mesh)
