"""One process loading a checkpoint into a template sharded over every device of the job.

``python tests/sharded_load_worker.py PROCESS_ID NUM_PROCESSES PORT FILE OUT``: with 2 processes
(gloo, 4 CPU devices each) or 1 (8 devices), load ``FILE`` (written from ``variables(megabytes)``
by ``interop.save_checkpoint``) into ``template(mesh)``, measure the peak resident memory the
load adds (``VmHWM`` after it, reset by ``/proc/self/clear_refs`` before it, minus ``VmRSS``
before it), then check each addressable shard against ``variables`` (the values the file was
written from), save what it loaded into one folder with every process (``saved_folder``), and
write ``OUT`` (JSON): the rise in bytes, the bytes of this process's shards,
and the shards that differ.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import interop
from jema._app.bench_sharded import status

# Flax path -> (shape, spec over the one mesh axis "d" of all 8 devices). Kernels split on
# either side of PyTorch's layout, an embedding on its rows, small leaves replicated.
LAYERS = {
    ("fc1", "kernel"): ((1024, 2048), P("d", None)),  # PyTorch's columns: strided blocks
    ("fc1", "bias"): ((2048,), P()),
    ("fc2", "kernel"): ((2048, 1024), P(None, "d")),  # PyTorch's rows: contiguous blocks
    ("embed", "embedding"): ((8192, 512), P("d", None)),
    ("conv", "kernel"): ((3, 3, 256, 512), P(None, None, None, "d")),
    ("norm", "scale"): ((512,), P()),
}


def repeats(megabytes: int) -> int:
    """How many copies of ``LAYERS`` make at least ``megabytes`` MB (at least one)."""
    per_repeat = sum(4 * int(np.prod(shape)) for shape, _ in LAYERS.values())
    return max(1, -(-int(megabytes * 1e6) // per_repeat))


def variables(megabytes: int) -> dict[str, Any]:
    """``LAYERS`` repeated to about ``megabytes`` MB of float32 values, the same in every call.

    Args:
      megabytes: the size; each repeat is about 38 MB.

    Returns:
      Linen variables of numpy arrays, layers ``<name>_<i>``.

    Example:
      >>> sorted(variables(1)["params"])[:2]
      ['conv_0', 'embed_0']
    """
    rng = np.random.default_rng(0)
    params: dict[str, dict[str, np.ndarray]] = {}
    for i in range(repeats(megabytes)):
        for (layer, leaf), (shape, _) in LAYERS.items():
            params.setdefault(f"{layer}_{i}", {})[leaf] = rng.standard_normal(shape, np.float32)
    return {"params": params}


def template(megabytes: int, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The shapes of ``variables(megabytes)`` as ``jax.ShapeDtypeStruct`` leaves sharded as
    ``LAYERS`` says."""
    params: dict[str, dict[str, jax.ShapeDtypeStruct]] = {}
    for i in range(repeats(megabytes)):
        for (layer, leaf), (shape, spec) in LAYERS.items():
            where = NamedSharding(mesh, spec)
            params.setdefault(f"{layer}_{i}", {})[leaf] = jax.ShapeDtypeStruct(
                shape, np.float32, sharding=where
            )
    return {"params": params}


def saved_folder(file: Path, num_processes: int) -> str:
    """The folder the workers of a run save into (a trailing separator: a folder)."""
    return f"{file}.{num_processes}.saved{os.sep}"


def main(process_id: int, num_processes: int, port: int, file: Path, out: Path) -> None:
    """Load, measure, check; write ``out``."""
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    megabytes = int(file.stem.rsplit("_", 1)[-1])
    tmpl = template(megabytes, jax.make_mesh((jax.device_count(),), ("d",)))
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    loaded = interop.load_checkpoint(file, tmpl)
    rise = status("VmHWM") - before
    values = variables(megabytes)
    wrong, held = [], 0
    for name, layer in loaded["params"].items():
        for leaf, array in layer.items():
            if array.sharding != tmpl["params"][name][leaf].sharding:
                wrong.append(f"{name}/{leaf}: sharding {array.sharding}")
            for shard in array.addressable_shards:
                held += shard.data.nbytes
                want = values["params"][name][leaf][shard.index]
                if np.asarray(shard.data).tobytes() != np.ascontiguousarray(want).tobytes():
                    wrong.append(f"{name}/{leaf}: device {shard.device.id}")
    # Every process saves what it loaded into one Hugging Face folder: process 0 gathers one
    # leaf at a time and writes, the others only take part in the gathers.
    interop.save_checkpoint(saved_folder(file, num_processes), net=loaded, max_shard_size="40MB")
    result = {"rise": rise, "held": held, "wrong": wrong, "devices": jax.local_device_count()}
    out.write_text(json.dumps(result))
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
