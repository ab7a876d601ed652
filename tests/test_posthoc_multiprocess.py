"""Two processes (gloo, 2 CPU devices each) hold a power EMA sharded over all 4 devices and save
snapshots together; this process reads them back and compares with a numpy replay."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_dtypes
import numpy as np

import jema
from jema import posthoc
from tests.test_multiprocess import free_port

WORKER = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jema
from jema import posthoc

process_id, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=60)
mesh = jax.make_mesh((jax.device_count(),), ("data",))
rows = NamedSharding(mesh, P("data"))


def global_array(value):
    return jax.make_array_from_callback(value.shape, rows, lambda index: value[index])


tx = jema.power_ema((0.05, 0.1))
params = {"w": global_array(np.zeros((8, 3), np.float32))}
state = jax.jit(tx.init)(params)
update = jax.jit(lambda s, p: tx.update(jax.tree.map(jnp.zeros_like, p), s, p)[1])
for t in range(1, 5):
    value = np.full((8, 3), t, np.float32) + np.arange(8, dtype=np.float32)[:, None]
    state = update(state, {"w": global_array(value)})
    if t % 2 == 0:
        posthoc.save_snapshot(folder, state, dtype="bfloat16")
jax.distributed.shutdown()
"""


def test_two_processes_save_snapshots_that_one_process_reads(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    folder, port = tmp_path / "snapshots", free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(port), str(folder)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    assert [(s.step, s.dtype) for s in posthoc.list_snapshots(folder)] == [
        (2, "bfloat16"),
        (4, "bfloat16"),
    ]
    written = {p.name for p in (folder / "4").rglob("*")}
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= written, written  # each wrote its shards
    for width in (0.05, 0.1):
        gamma = jema.sigma_rel_to_gamma(width)
        ema = np.zeros((8, 3))
        for t in range(1, 5):
            beta = (1 - 1 / t) ** (gamma + 1)
            ema = beta * ema + (1 - beta) * (t + np.arange(8.0)[:, None])
        stored = posthoc.load_snapshot(folder, 4, width)["w"]
        assert stored.dtype == ml_dtypes.bfloat16 and stored.shape == (8, 3)
        want = ema.astype(np.float32).astype(ml_dtypes.bfloat16)
        np.testing.assert_allclose(stored.astype(np.float32), want.astype(np.float32), rtol=2**-8)
