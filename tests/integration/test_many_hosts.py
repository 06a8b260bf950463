"""README 'Many hosts': the same ``train.py`` command in every process, as two local processes.

Its own file so that the parallel test run (``make test``: pytest-xdist, one file per worker) can run
it beside the long README walk-through in ``test_readme_commands.py``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess

import numpy as np
import pytest

from readme_session import ROOT
from train_subprocess import env as subprocess_env

TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_many_hosts_as_two_local_processes(tmp_path):
    """README 'Many hosts': the same train.py command in every process with MASKX_DISTRIBUTED=1 (and the
    coordinator's address, which jax.distributed.initialize() reads from JAX_COORDINATOR_ADDRESS). Two
    processes on this machine, one CPU device each: one mesh over both, each loads half of every batch,
    one set of checkpoints and metrics."""
    from train_subprocess import TINY_CONFIG, command

    port = _free_port()
    cmd = command(str(tmp_path / "run"), "--config.train.steps=2", "--config.train.checkpoint_every=1",
                  data_dir=str(tmp_path / "data"), config=TINY_CONFIG)
    procs = []
    for rank in range(2):
        env = subprocess_env(MASKX_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {rank}: exit {p.returncode}\n{out[-4000:]}"
        assert f"process {rank} of 2" in out and "mesh {'data': 2} over 2 devices (2 processes)" in out, out[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2"]
    assert json.load(open(tmp_path / "run" / "metrics.json"))["all"]

    # The same command in ONE process over the same mesh shape (two CPU devices): each of the two processes
    # above loaded its own half of the first global batch, together the whole of it, and the two runs end
    # with the same weights (up to the order of the gradient all-reduce's sums).
    single = subprocess.run(cmd[:cmd.index("--workdir") + 1] + [str(tmp_path / "single")]
                            + cmd[cmd.index("--workdir") + 2:], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S,
                            env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert single.returncode == 0, single.stdout[-4000:]
    halves = [_loaded_images(out, rank, 2) for rank, out in enumerate(outputs)]
    whole = _loaded_images(single.stdout, 0, 1)
    assert halves[0] and halves[1] and not set(halves[0]) & set(halves[1])
    assert halves[0] + halves[1] == whole  # process p takes the p-th contiguous slice
    from maskx_jax import workdir as workdir_lib

    two, _ = workdir_lib.load_variables(str(tmp_path / "run"))
    one, _ = workdir_lib.load_variables(str(tmp_path / "single"))
    assert set(two) == set(one)
    for path, a in one.items():
        np.testing.assert_allclose(two[path], a, rtol=1e-4, atol=1e-6, err_msg=str(path))
    after_one, _ = workdir_lib.load_variables(str(tmp_path / "single"), step=1)
    assert sum(not np.array_equal(after_one[p], a) for p, a in one.items()) > 10  # the steps did train


def _loaded_images(log: str, rank: int, count: int) -> list[int]:
    """The image ids process ``rank`` of ``count`` says it loaded for its first step (train_lib logs them)."""
    marker = f"process {rank} of {count} loads images "
    line = next(line for line in log.splitlines() if marker in line)
    return json.loads(line.split(marker, 1)[1].split(" of step ", 1)[0])
