"""Two processes on localhost (gloo, 2 CPU devices each) train with the EMA, save and restore an
orbax checkpoint, and end where one process on one device ends with the same global batches.

The work is ``tests/multiprocess_worker.py``; the reference runs in this process meanwhile.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import multiprocess_worker

WORKER = Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT_S = 150


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir: Path, *memory_kind: str) -> None:
    """Start both workers, run the 1-process reference, wait; kill what is left in any case."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port, logs, procs = free_port(), [], []
    try:
        for i in range(2):
            logs.append((workdir / f"worker{i}.log").open("w"))
            procs.append(
                subprocess.Popen(
                    [
                        *(sys.executable, str(WORKER), str(i), "2", str(port)),
                        *(str(workdir / "multi"), *memory_kind),
                    ],
                    env=env,
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        multiprocess_worker.main(0, 1, 0, workdir / "single", *memory_kind)
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    for i, proc in enumerate(procs):
        log = (workdir / f"worker{i}.log").read_text()[-3000:]
        assert proc.returncode == 0, f"worker {i} exited {proc.returncode}:\n{log}"


@pytest.mark.parametrize("memory_kind", [(), ("pinned_host",)], ids=["device", "pinned_host"])
def test_two_processes_match_one_process(tmp_path, memory_kind):
    run_two_processes(tmp_path, *memory_kind)
    multi = dict(np.load(tmp_path / "multi" / "result.npz"))
    single = dict(np.load(tmp_path / "single" / "result.npz"))
    assert sorted(multi) == sorted(single)
    assert any(".ema[" in key for key in multi) and any(".batch_stats[" in key for key in multi)
    # Each process wrote its own shards of the checkpoint (orbax's per-process OCDBT files).
    written = [p.name for p in (tmp_path / "multi" / "ckpt").rglob("*")]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(written), written

    # The checkpoint written by both processes restores exactly what they saved.
    for key in (k for k in multi if k.startswith("saved")):
        restored = "restored" + key.removeprefix("saved")
        np.testing.assert_array_equal(multi[restored], multi[key], err_msg=key)

    # Counts and steps are equal; floats agree to rounding: the 2-process all-reduces (gloo)
    # sum the batch's gradients and statistics in another order than one device does.
    for key in (k for k in multi if k.startswith("final")):
        if multi[key].dtype.kind in "iu":
            np.testing.assert_array_equal(multi[key], single[key], err_msg=key)
        else:
            np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert multi["final.opt_state[1].count"] == 5 and multi["final.step"] == 5
    assert multi["ema_memory_kinds"].tolist() == (list(memory_kind) or ["device"])
