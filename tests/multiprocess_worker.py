"""One process of the multi-process EMA test; :func:`main` is also the 1-process reference.

``python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR``: with 2 processes
(2 CPU devices each, gloo collectives), or called in one process, train a BatchNorm MLP with
``jema.with_ema(optax.adam)`` on a mesh of all devices, kernels split FSDP-style, for 3 steps
on the same global batches; save an orbax checkpoint with ``jema.checkpoint``, restore it into
a fresh state, train 2 more steps. Process 0 writes ``WORKDIR/result.npz`` (every leaf gathered
to numpy, keys prefixed ``saved``, ``restored`` and ``final``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jema
import jema.checkpoint
from jema.train_state import TrainState

IN, HIDDEN, CLASSES, BATCH = 4, 16, 8, 16


class Mlp(nn.Module):
    """Dense, BatchNorm, Dense."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        # No bias before BatchNorm: its gradient is rounding noise that adam would amplify.
        x = nn.Dense(HIDDEN, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dense(CLASSES)(nn.relu(x))


def global_array(value: Any, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value every process holds whole; each fills its own shards."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def batch(seed: int, sharding: NamedSharding) -> tuple[jax.Array, jax.Array]:
    """Global batch ``seed``, split over the 'data' axis (each process gives its rows)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, IN)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
    return global_array(x, sharding), global_array(y, sharding)


def fresh_state(mesh: jax.sharding.Mesh, memory_kind: str | None = None) -> TrainState:
    """The same initial state in every process: kernels split over 'data', the rest replicated."""
    model = Mlp()
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(0), jnp.zeros((1, IN)), train=False
    )
    host = jax.tree.map(np.asarray, variables)
    specs = jax.tree_util.tree_map_with_path(
        lambda path, x: P(None, "data") if path[-1].key == "kernel" else P(), host
    )
    variables = jax.tree.map(
        lambda x, spec: global_array(x, NamedSharding(mesh, spec)), host, specs
    )
    return jax.jit(
        lambda v: TrainState.create(
            apply_fn=model.apply,
            params=v["params"],
            batch_stats=v["batch_stats"],
            tx=jema.with_ema(
                optax.adam(0.05), decay=0.9, decay_type="threshold", ema_memory_kind=memory_kind
            ),
        )
    )(variables)


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> TrainState:
    """One step of softmax cross-entropy; the EMA averages the params and batch_stats."""

    def loss_fn(params: Any) -> Any:
        logits, new = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, x, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new["batch_stats"]

    grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats)


def gathered(prefix: str, state: TrainState) -> dict[str, np.ndarray]:
    """Every leaf of ``state`` as a global numpy array, keyed ``prefix/<path>``."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    values = multihost_utils.process_allgather([leaf for _, leaf in leaves], tiled=True)
    return {
        prefix + jax.tree_util.keystr(path): np.asarray(value)
        for (path, _), value in zip(leaves, values, strict=True)
    }


def main(
    process_id: int, num_processes: int, port: int, workdir: Path, memory_kind: str | None = None
) -> None:
    """Train, checkpoint, restore, train on; process 0 writes ``result.npz``.

    ``memory_kind`` is the EMA's (``ema_memory_kind``): None keeps it with the params.
    """
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=60,
        )
    assert jax.process_count() == num_processes, jax.devices()
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    data = NamedSharding(mesh, P("data"))
    state = fresh_state(mesh, memory_kind)
    for seed in range(3):
        state = train_step(state, *batch(seed, data))
    result = gathered("saved", state)
    jema.checkpoint.save(workdir / "ckpt", 3, state)
    state = jema.checkpoint.restore(workdir / "ckpt", fresh_state(mesh, memory_kind))
    result |= gathered("restored", state)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(jema.ema_params(state.opt_state))}
    for seed in range(3, 5):
        state = train_step(state, *batch(seed, data))
    result |= gathered("final", state)
    if jax.process_index() == 0:
        np.savez(workdir / "result.npz", ema_memory_kinds=np.array(sorted(kinds)), **result)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:])
