"""(s) Loading a safetensors file into a template sharded over 8 CPU devices.

Run ``python -m jema._app.bench_sharded [--megabytes M] [--repeats N]``. It writes ``--megabytes``
(1024 by default) of float32 Dense and Conv kernels as a safetensors file in a temporary folder
(removed afterwards), then loads it, each run in a fresh process with 8 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), the file warm in the page cache:

- orbax's ``SafetensorsLayout`` (``orbax.checkpoint.experimental.v1``): the raw tensors in
  PyTorch's layout, each with the sharding that gives every device the same values as the
  Flax template's (the reference; "orbax too old" where the installed orbax lacks it);
- ``interop.load_checkpoint`` into the sharded Flax template (goal: at most 1.0x orbax's time,
  at most its peak memory);
- ``interop.load_checkpoint`` into an unsharded template, then ``jax.device_put``;
- ``interop.load_checkpoint`` in 2 processes of 4 devices each (gloo): each process's peak
  memory against one process's (goal: at most 0.65x).

Time is from the call to the arrays being ready; peak memory is the rise of the process's
peak resident set (``VmHWM``, reset before the load) over its resident set before it. Each
row's figures are medians over ``--repeats`` rounds, run round-robin.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jema._app.arguments import Parser, positive_int
from jema._app.bench import Row, format_table

METHODS = ("orbax", "jema", "naive")
GOAL_TIME, GOAL_MEMORY, GOAL_PROCESSES = 1.0, 1.0, 0.65
# Flax kernel shape -> the spec of its 8-way split, in Flax's layout and in PyTorch's.
LAYERS: tuple[tuple[tuple[int, ...], tuple[str | None, ...], tuple[str | None, ...]], ...] = (
    ((1024, 4096), ("d", None), (None, "d")),  # a Dense kernel split on PyTorch's columns
    ((4096, 1024), (None, "d"), ("d", None)),  # ... and on PyTorch's rows
    ((3, 3, 256, 512), (None, None, None, "d"), ("d", None, None, None)),  # a Conv kernel
)


Layer = tuple[str, tuple[int, ...], tuple[str | None, ...], tuple[str | None, ...]]


def layers(megabytes: int) -> list[Layer]:
    """The kernels of a ``megabytes`` MB file: name, Flax shape, Flax spec, PyTorch spec.

    Args:
      megabytes: the size (at least one kernel).

    Returns:
      ``LAYERS`` in turn until the size is reached, named ``layer<i>``.

    Example:
      >>> [(name, shape) for name, shape, _, _ in layers(20)]
      [('layer0', (1024, 4096)), ('layer1', (4096, 1024))]
    """
    out: list[Layer] = []
    size = 0
    while not out or size < megabytes * 1e6:
        shape, flax_spec, torch_spec = LAYERS[len(out) % len(LAYERS)]
        out.append((f"layer{len(out)}", shape, flax_spec, torch_spec))
        size += 4 * int(np.prod(shape))
    return out


def write(path: Path, megabytes: int) -> None:
    """Writes the file with ``interop.save_checkpoint``: random kernels of ``layers``.

    Args:
      path: the safetensors file to write.
      megabytes: its size, as in ``layers``.

    Example:
      >>> import interop
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     write(Path(folder) / "bench.safetensors", 1)
      ...     list(interop.read_checkpoint(Path(folder) / "bench.safetensors")["net"])
      ['layer0.weight']
    """
    import interop

    rng = np.random.default_rng(0)
    params = {
        name: {"kernel": rng.standard_normal(shape, np.float32)}
        for name, shape, _, _ in layers(megabytes)
    }
    interop.save_checkpoint(path, net={"params": params})


def orbax_missing() -> str:
    """Why orbax's ``SafetensorsLayout`` cannot run here, or ``""`` when it can.

    Returns:
      ``"orbax too old (<version>)"``, ``"orbax not installed"`` or ``""``.

    Example:
      >>> orbax_missing() in ("", "orbax not installed") or orbax_missing().startswith("orbax too")
      True
    """
    try:
        from orbax.checkpoint.experimental import v1
    except ImportError:
        try:
            return f"orbax too old ({importlib.metadata.version('orbax-checkpoint')})"
        except importlib.metadata.PackageNotFoundError:
            return "orbax not installed"
    layout = getattr(getattr(v1, "options", None), "CheckpointLayout", None)
    if layout is None or not hasattr(layout, "SAFETENSORS"):
        return f"orbax too old ({importlib.metadata.version('orbax-checkpoint')})"
    return ""


def status(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes.

    Args:
      field: the field's name.

    Returns:
      Its value in bytes.

    Raises:
      KeyError: when the file has no such field.

    Example:
      >>> status("VmRSS") > 0
      True
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def load_once(method: str, path: Path, megabytes: int) -> dict[str, float]:
    """One load in this process (its devices already set): seconds and peak memory rise.

    Args:
      method: ``"orbax"``, ``"jema"`` or ``"naive"``.
      path: the file ``write`` wrote.
      megabytes: the size it was written with.

    Returns:
      ``{"seconds": ..., "rise": bytes}``.

    Example:
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     write(Path(folder) / "bench.safetensors", 1)
      ...     sorted(load_once("jema", Path(folder) / "bench.safetensors", 1))
      ['rise', 'seconds']
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import interop

    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    plan = layers(megabytes)
    shardings = {name: NamedSharding(mesh, P(*flax)) for name, _, flax, _ in plan}
    if method == "orbax":
        from orbax.checkpoint.experimental import v1 as ocp

        abstract = {
            f"net.{name}.weight": jax.ShapeDtypeStruct(
                (shape[-1], shape[-2], *shape[:-2]) if len(shape) > 2 else shape[::-1],
                np.float32,
                sharding=NamedSharding(mesh, P(*torch)),
            )
            for name, shape, _, torch in plan
        }

        def load() -> Any:
            with ocp.Context(checkpoint_layout="safetensors"):
                return ocp.load(path, abstract, checkpointable_name=None)
    else:
        sharded = method == "jema"
        template = {
            "params": {
                name: {
                    "kernel": jax.ShapeDtypeStruct(
                        shape, np.float32, sharding=shardings[name] if sharded else None
                    )
                }
                for name, shape, _, _ in plan
            }
        }

        def load() -> Any:
            out = interop.load_checkpoint(path, template)
            if sharded:
                return out
            where = {"params": {name: {"kernel": s} for name, s in shardings.items()}}
            return jax.device_put(out, where)

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    start = time.perf_counter()
    jax.block_until_ready(load())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rise": status("VmHWM") - before}


def _run(method: str, path: Path, megabytes: int, processes: int = 1) -> list[dict[str, float]]:
    """``load_once`` in ``processes`` fresh processes, 8 devices in all; their results."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "jema._app.bench_sharded", "worker", method, str(path)]
    procs = [
        subprocess.Popen(
            [*argv, str(megabytes), str(i), str(processes), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode:
            raise RuntimeError(f"the {method} load exited {proc.returncode}: {err[-2000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def measure(megabytes: int, repeats: int, folder: str) -> list[Row]:
    """Write the file in ``folder``, run every row ``repeats`` times round-robin, tabulate.

    Args:
      megabytes: the file's size.
      repeats: rounds.
      folder: where the file goes.

    Returns:
      The four rows.

    Example:
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     rows = measure(8, 1, folder)  # one 16.8 MB kernel; every load in new processes
      >>> [row.name.rsplit(": ", 1)[-1] for row in rows]  # doctest: +NORMALIZE_WHITESPACE
      ['orbax SafetensorsLayout', 'jema sharded load_checkpoint',
       'load_checkpoint + jax.device_put', 'peak RSS per process vs 1 process']
      >>> rows[1].ms > 0 and "peak RSS +" in rows[1].rate, rows[3].target
      (True, '<= 0.65x')
    """
    path = Path(folder) / "bench.safetensors"
    write(path, megabytes)
    missing = orbax_missing()
    methods = [m for m in METHODS if not (m == "orbax" and missing)]
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in (*methods, "two")}
    for _ in range(repeats):
        for method in methods:
            runs[method] += _run(method, path, megabytes)
        runs["two"].append({"rise": max(p["rise"] for p in _run("jema", path, megabytes, 2))})
    seconds = {m: statistics.median(r["seconds"] for r in runs[m]) for m in methods}
    rise = {m: statistics.median(r["rise"] for r in runs[m]) for m in (*methods, "two")}
    size = path.stat().st_size / 1e9

    def figures(method: str) -> str:
        text = f"{size / seconds[method]:.2f} GB/s, peak RSS +{rise[method] / 1e6:.0f} MB"
        if "orbax" in seconds and method != "orbax":
            text += (
                f"; {seconds[method] / seconds['orbax']:.2f}x orbax's time, "
                f"{rise[method] / rise['orbax']:.2f}x its memory"
            )
        return text

    name = f"(s) {size:.2f} GB safetensors -> 8 CPU devices:"
    rows = [
        Row(f"{name} orbax SafetensorsLayout", 1e3 * seconds["orbax"], figures("orbax"))
        if "orbax" in seconds
        else Row(f"{name} orbax SafetensorsLayout", float("nan"), missing)
    ]
    target = f"<= {GOAL_TIME}x orbax's time, <= {GOAL_MEMORY}x its memory"
    met = None
    if "orbax" in seconds:
        fast = seconds["jema"] <= GOAL_TIME * seconds["orbax"]
        met = fast and rise["jema"] <= GOAL_MEMORY * rise["orbax"]
    rows.append(Row(f"{name} jema sharded load_checkpoint", 1e3 * seconds["jema"], figures("jema"),
                    target if met is not None else "", met))  # fmt: skip
    rows.append(Row(f"{name} load_checkpoint + jax.device_put", 1e3 * seconds["naive"],
                    figures("naive")))  # fmt: skip
    ratio = rise["two"] / rise["jema"]
    rows.append(
        Row(
            "(s) jema, 2 processes x 4 devices: peak RSS per process vs 1 process",
            float("nan"),
            f"+{rise['two'] / 1e6:.0f} MB vs +{rise['jema'] / 1e6:.0f} MB, {ratio:.2f}x",
            f"<= {GOAL_PROCESSES}x",
            ratio <= GOAL_PROCESSES,
        )
    )
    return rows


def _worker(argv: Sequence[str]) -> int:
    method, path, megabytes, process, processes, port = argv
    if int(processes) > 1:
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", int(processes), int(process))
    print(json.dumps(load_once(method, Path(path), int(megabytes))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jema._app.bench_sharded [--megabytes M] [--repeats N]``: print the table.

    Args:
      argv: the arguments; None reads ``sys.argv``. ``worker METHOD PATH MEGABYTES PROCESS
        PROCESSES PORT`` is one load, run by the benchmark in a fresh process.

    Returns:
      The exit status, 0.

    Example:
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     write(Path(folder) / "bench.safetensors", 1)
      ...     main(["worker", "naive", str(Path(folder) / "bench.safetensors"), "1", "0", "1", "0"])
      {"seconds": ..., "rise": ...}
      0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    parser = Parser(prog="python -m jema._app.bench_sharded", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3, help="rounds")
    parser.add_argument("--megabytes", type=positive_int, default=1024, help="size of the file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        print(format_table(measure(args.megabytes, args.repeats, folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
