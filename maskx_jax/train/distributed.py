"""Multi-process start-up, the device mesh, and quieter library logs.

One :class:`jax.sharding.Mesh` with a ``data`` axis over every device of every process; batches are sharded on
their leading axis. Multi-process runs call :func:`jax.distributed.initialize` when the environment asks for it
(:func:`maybe_initialize_distributed`).
"""
from __future__ import annotations

import logging as logging_std
import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

DATA_AXIS = "data"


def maybe_initialize_distributed() -> bool:
    """Call :func:`jax.distributed.initialize` when the environment says this is a multi-process run.

    The environment variable ``MASKX_DISTRIBUTED`` decides when set: ``1``/``true`` always
    initialises, ``0``/``false`` never does. When it is unset, initialisation happens if one of
    these is present: ``JAX_COORDINATOR_ADDRESS`` (plain multi-process launch; also set
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, which are passed on), a SLURM job step with
    more than one task (``SLURM_STEP_ID`` and ``SLURM_NTASKS`` > 1), or Open MPI with more than
    one rank (``OMPI_COMM_WORLD_SIZE`` > 1). JAX then detects the coordinator, the process count
    and the process id itself (SLURM, Open MPI, Cloud TPU, Kubernetes). Must run before anything
    touches a device. Returns whether it initialised.
    """
    env = os.environ
    flag = env.get("MASKX_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    auto = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
            or ("SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1)
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)
    if flag not in ("1", "true", "yes", "on") and not auto:
        return False
    kwargs = {}
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


class _DropLibraryInfo(logging_std.Filter):
    """Drops orbax's per-save INFO chatter (dozens of lines per checkpoint); warnings pass."""

    def filter(self, record: logging_std.LogRecord) -> bool:
        return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname.replace(os.sep, "/")


def quiet_library_logs() -> None:
    """Keep the console readable: library INFO logs (orbax) are dropped, this module's are kept."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
        handler.addFilter(_DropLibraryInfo())


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))
