"""Sharded templates without PyTorch: nnx abstract models, refusals, one device, two processes.

The 8-device loads run in ``tests/sharded_load_checks.py`` and the multi-process ones in
``tests/sharded_load_worker.py`` (fresh processes, their device counts forced).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import make_single_device_sharding

import interop
from tests import sharded_load_worker
from tests.sharded_load_checks import Mixed
from tests.test_multiprocess import free_port

CHECKS = Path(__file__).with_name("sharded_load_checks.py")
WORKER = Path(__file__).with_name("sharded_load_worker.py")
MEGABYTES = 150
TIMEOUT_S = 150


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    return env | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """An nnx model's state saved both ways, loaded by the checks script; its refusals."""
    folder = tmp_path_factory.mktemp("sharded_nnx")
    with nnx.use_eager_sharding(False):  # one device here: the annotations are for later
        state = nnx.state(Mixed(nnx.Rngs(1)), (nnx.Param, nnx.BatchStat))
    state["bn"]["mean"][...] = jnp.linspace(-1.0, 1.0, 16)  # statistics that are not zeros
    interop.save_checkpoint(folder / "nnx.safetensors", net=state)
    interop.save_checkpoint(folder / "nnx.pth", net=state)
    fc = {
        "fc": {
            "kernel": np.arange(80, dtype=np.float32).reshape(10, 8),
            "bias": np.ones(8, np.float32),
        }
    }
    interop.save_checkpoint(folder / "fc.pth", net={"params": fc})
    files = ["nnx.safetensors", "nnx.pth"]
    plan = {"cases": [{"name": "nnx", "template": "nnx", "files": files}], "refusals": "fc.pth"}
    (folder / "plan.json").write_text(json.dumps(plan))
    done = subprocess.run(
        [sys.executable, str(CHECKS), str(folder)],
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return folder, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("file", ["nnx.safetensors", "nnx.pth"])
@pytest.mark.parametrize("kind", ["state", "module"])
def test_nnx_abstract_models_load_with_their_annotated_shardings(checked, kind, file):
    folder, facts = checked
    load = facts[f"nnx/{file}/{kind}"]
    assert load["wrong"] == []
    specs = {path.split("'")[1]: parts for path, (_, parts) in load["specs"].items() if any(parts)}
    assert specs == {  # path -> mesh axes per dim; the other 7 leaves replicated
        "conv": [None, None, "x", "y"],
        "embed": ["y", None],
        "fc": ["y", "x"],
        "norm": ["y"],
    }
    assert len(load["specs"]) == 11
    back = interop.read_checkpoint(folder / f"back_nnx_{kind}.safetensors")["net"]
    source = interop.read_checkpoint(folder / "nnx.safetensors")["net"]
    assert sorted(back) == sorted(source)
    for key, array in source.items():
        assert back[key].dtype == array.dtype and back[key].tobytes() == array.tobytes(), key


def test_shardings_that_cannot_be_honoured_are_refused_naming_the_leaf_others_load(checked):
    _, facts = checked
    said = facts["refusals"]
    assert "params/fc/kernel (10, 8): the template's sharding cannot hold it" in said["uneven"]
    assert "mesh axes divide" in said["uneven"]
    assert "params/fc/kernel: the template's sharding" in said["abstract"]
    assert "jax.set_mesh(mesh)" in said["abstract"]
    assert "params/fc/kernel: float64 in the template" in said["float64"]
    assert "jax_enable_x64" in said["float64"]
    assert said["abstract_inside_set_mesh"] == "True"
    assert said["cast_equal"] is True


def test_templates_on_one_device_load_as_before(tmp_path):
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / "one.safetensors"
    interop.save_checkpoint(path, net={"params": {"fc": {"kernel": kernel}}})
    device = jax.devices()[0]
    on_one = jax.ShapeDtypeStruct((2, 3), np.float32, sharding=make_single_device_sharding(device))
    plain = jax.ShapeDtypeStruct((2, 3), np.float32)
    for leaf in (on_one, plain, jnp.zeros((2, 3))):
        out = interop.load_checkpoint(path, {"params": {"fc": {"kernel": leaf}}})
        got = out["params"]["fc"]["kernel"]
        assert isinstance(got, jax.Array) and not got.committed
        assert got.sharding == make_single_device_sharding(device)
        np.testing.assert_array_equal(got, kernel)
    host = make_single_device_sharding(device, memory_kind="pinned_host")  # another memory
    leaf = jax.ShapeDtypeStruct((2, 3), np.float32, sharding=host)
    got = interop.load_checkpoint(path, {"params": {"fc": {"kernel": leaf}}})["params"]["fc"]
    assert got["kernel"].sharding == host and got["kernel"].committed
    np.testing.assert_array_equal(got["kernel"], kernel)


@pytest.fixture(scope="module", params=["safetensors", "pth"])
def checkpoint(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("memory") / f"ckpt_{MEGABYTES}.{request.param}"
    interop.save_checkpoint(path, net=sharded_load_worker.variables(MEGABYTES))
    return path


def _run(checkpoint: Path, processes: int) -> list[dict[str, Any]]:
    """``processes`` workers (8 devices in all) loading ``checkpoint``; their results."""
    port, outs, procs = free_port(), [], []
    try:
        for i in range(processes):
            outs.append(checkpoint.with_name(f"{checkpoint.name}.{processes}.{i}.json"))
            argv = [sys.executable, str(WORKER), str(i), str(processes), str(port)]
            procs.append(
                subprocess.Popen(
                    [*argv, str(checkpoint), str(outs[-1])],
                    env=_env(8 // processes),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        logs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"worker {i} exited {proc.returncode}:\n{log[-3000:]}"
    return [json.loads(out.read_text()) for out in outs]


def test_two_processes_each_hold_and_touch_only_their_shards(checkpoint):
    (one,) = _run(checkpoint, 1)
    two = _run(checkpoint, 2)
    assert one["devices"] == 8 and [p["devices"] for p in two] == [4, 4]
    assert one["wrong"] == [] and [p["wrong"] for p in two] == [[], []]
    # Each process holds half of the shards (replicated leaves: 4 copies, not 8).
    assert [2 * p["held"] for p in two] == [one["held"]] * 2
    # What every process saved together is the file, key for key and bit for bit.
    source = interop.read_checkpoint(checkpoint)["net"]
    for processes in (1, 2):
        saved = interop.read_checkpoint(sharded_load_worker.saved_folder(checkpoint, processes))
        assert sorted(saved) == sorted(source)
        assert all(saved[k].tobytes() == np.ascontiguousarray(source[k]).tobytes() for k in saved)
    assert one["rise"] >= one["held"] > MEGABYTES * 1e6
    for process in two:
        # The memory it measures counts the shards it holds, and little more: the file's
        # pages it maps are let go chunk by chunk, and it maps no other process's.
        assert process["held"] <= process["rise"] <= 0.65 * one["rise"], (process, one)
