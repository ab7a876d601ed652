"""Speed of the EMA at scale: a real train step, sparse updates, and a sharded update.

Run ``python -m jema bench-scale`` (or ``jema bench-scale``). It prints a markdown table with:

- (e) a jitted train step (forward, backward, adam) of a ~10M-parameter MLP, with and without
  the EMA, and their ratio;
- (f) the EMA update alone on a 25M-parameter tree with ``every_k_steps`` = 1, 4, 16, as the
  mean cost per optimizer step over 16 steps (the cost falls about as 1/k);
- (g) the EMA update on an 8-device mesh (FSDP-style sharding), in a subprocess with 8 forced
  CPU devices; on a CPU those devices share the same cores, so this row shows that sharding
  adds no collective cost, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

import jema
from jema._app.arguments import bench_parser, positive_int
from jema._app.bench import (
    DECAY,
    DECAY_TYPE,
    LEARNING_RATE,
    Case,
    Row,
    ema_case,
    format_table,
    jax_tree,
    leaf_sizes,
    time_cases,
)

SPARSE_STEPS = 16
MESH_DEVICES = 8
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


class MLP(nn.Module):
    """``depth`` Dense layers of ``width`` features with ReLU between them.

    Example:
      >>> MLP(width=4, depth=2).init(jax.random.key(0), jnp.zeros((1, 4)))["params"].keys()
      dict_keys(['Dense_0', 'Dense_1'])
    """

    width: int = 1536
    depth: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = nn.Dense(self.width)(x)
            x = nn.relu(x) if i < self.depth - 1 else x
        return x


def model_step_case(name: str, tx: optax.GradientTransformation, width: int, batch: int) -> Case:
    """(e) one jitted train step of :class:`MLP`: loss, gradients, ``tx``; params and state donated.

    Args:
      name: the row's label.
      tx: the optimizer.
      width: the MLP's width (4 layers of ``width**2`` weights).
      batch: examples per step.

    Returns:
      The case; its carry is ``(params, opt_state, x)``.

    Example:
      >>> case = model_step_case("sgd", optax.sgd(0.1), width=8, batch=2)
      >>> case.carry = case.step(case.carry)
    """
    model = MLP(width)
    x = jax.random.normal(jax.random.key(1), (batch, width))
    params = model.init(jax.random.key(0), x)["params"]

    def train_step(params: Any, opt_state: Any, x: jax.Array) -> tuple[Any, Any]:
        grads = jax.grad(lambda p: jnp.mean(cast(jax.Array, model.apply({"params": p}, x)) ** 2))(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    return Case(
        name, lambda c: (*jax.block_until_ready(step(*c)), c[2]), (params, tx.init(params), x)
    )


def sparse_ema_case(sizes: Sequence[int], every_k_steps: int) -> Case:
    """(f) :data:`SPARSE_STEPS` EMA updates in a row with ``every_k_steps``, jitted and donated.

    Args:
      sizes: the leaves' lengths.
      every_k_steps: the EMA's ``every_k_steps``.

    Returns:
      The case; one run is :data:`SPARSE_STEPS` optimizer steps.

    Example:
      >>> case = sparse_ema_case([4], every_k_steps=4); case.carry = case.step(case.carry)
      >>> int(case.carry[1].count)
      16
    """
    tx = jema.ema_transform(DECAY, every_k_steps=every_k_steps)
    update = jax.jit(tx.update, donate_argnums=(0, 1))
    params = jax_tree(sizes, 2)

    def run(carry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
        updates, state, params = carry
        for _ in range(SPARSE_STEPS):
            updates, state = update(updates, state, params)
        return (*jax.block_until_ready((updates, state)), params)

    carry = (jax_tree(sizes, 3, scale=1e-2), tx.init(params), params)
    return Case(f"(f) EMA update, every_k_steps={every_k_steps}", run, carry)


def measure(width: int, batch: int, params: int, leaves: int, repeats: int) -> list[Row]:
    """Time rows (e) and (f) in this process.

    Args:
      width: the MLP's width for (e).
      batch: the batch size for (e).
      params: weights in the (f) tree.
      leaves: leaves in the (f) tree.
      repeats: timed runs per row.

    Returns:
      The rows (e) adam, (e) adam + EMA, then one (f) row per k.

    Example:
      >>> [r.name[:3] for r in measure(8, 2, 64, 2, repeats=1)]
      ['(e)', '(e)', '(f)', '(f)', '(f)']
    """
    model_cases = [
        model_step_case("(e) MLP train step, adam", optax.adam(LEARNING_RATE), width, batch),
        model_step_case(
            "(e) MLP train step, adam + jema EMA",
            jema.with_ema(optax.adam(LEARNING_RATE), decay=DECAY),
            width,
            batch,
        ),
    ]
    n_params = sum(x.size for x in jax.tree.leaves(model_cases[0].carry[0]))
    seconds = time_cases(model_cases, repeats)
    (_, t_adam), (name, t_ema) = seconds.items()
    rows = [
        Row(f"(e) MLP train step, adam ({n_params / 1e6:.1f}M params)", 1e3 * t_adam, ""),
        Row(name, 1e3 * t_ema, f"{t_ema / t_adam:.3f}x adam"),
    ]
    sparse = [sparse_ema_case(leaf_sizes(params, leaves), k) for k in (1, 4, 16)]
    per_step = {n: t / SPARSE_STEPS for n, t in time_cases(sparse, repeats).items()}
    dense = next(iter(per_step.values()))
    rows += [Row(n, 1e3 * t, f"{t / dense:.2f}x k=1 per step") for n, t in per_step.items()]
    return rows


def _sharded_rows(params: int, leaves: int, repeats: int) -> list[Row]:
    """(g) the EMA update alone on a 1-device placement vs an 8-device FSDP-style mesh.

    Must run in a process with 8 devices (see :func:`main`).

    Args:
      params: weights in the tree.
      leaves: leaves in the tree.
      repeats: timed runs per row.

    Returns:
      Two rows: one device, then the mesh.

    Raises:
      RuntimeError: when fewer than 8 devices are visible.
    """
    if jax.device_count() < MESH_DEVICES:
        raise RuntimeError(f"needs {MESH_DEVICES} devices; this process sees {jax.device_count()}")
    mesh = jax.make_mesh((MESH_DEVICES,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sizes = [n - n % MESH_DEVICES for n in leaf_sizes(params, leaves)]
    one = ema_case(sizes, name="(g) EMA update, 1 device", where=jax.devices()[0])
    mesh_case = ema_case(sizes, name=f"(g) EMA update, {MESH_DEVICES}-device mesh", where=sharding)
    update = jax.jit(jema.ema_transform(DECAY, DECAY_TYPE).update, donate_argnums=(0, 1))
    hlo = update.lower(*mesh_case.carry).compile().as_text() or ""
    seconds = time_cases([one, mesh_case], repeats)
    collectives = [op for op in COLLECTIVES if op in hlo]
    note = f"collectives in the step: {', '.join(collectives) or 'none'}"
    return [Row(name, 1e3 * t, note if "mesh" in name else "") for name, t in seconds.items()]


def _run(
    repeats: int = 10,
    width: int = 1536,
    batch: int = 64,
    params: int = 25_000_000,
    leaves: int = 100,
) -> list[Row]:
    """Measure (e) and (f) here and (g) in an 8-device subprocess; print the table.

    Args:
      repeats: timed runs per row (the median is reported).
      width: the MLP's width for (e) (1536 gives 9.4M params).
      batch: the batch size for (e).
      params: weights in the (f) and (g) trees.
      leaves: leaves in the (f) and (g) trees.

    Returns:
      All rows.
    """
    print(
        f"jema bench_scale: median of {repeats} runs; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}"
    )
    rows = measure(width, batch, params, leaves, repeats)
    rows += _sharded_in_subprocess(params, leaves, repeats)
    print(format_table(rows))
    return rows


def _sharded_in_subprocess(params: int, leaves: int, repeats: int) -> list[Row]:
    flags = f"--xla_force_host_platform_device_count={MESH_DEVICES}"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    command = [sys.executable, "-m", "jema._app.bench_scale", "--sharded-only"]
    command += ["--repeats", str(repeats), "--params", str(params), "--leaves", str(leaves)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        name, ms, note = line.split("\t")
        rows.append(Row(name, float(ms), note))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jema bench-scale [--repeats N] [--width W] [--params P] [--leaves L]``.

    Args:
      argv: the arguments; None reads ``sys.argv``.

    Returns:
      The exit status (0).

    Example:
      >>> main("--repeats 1 --width 8 --batch 2 --params 1000 --leaves 4".split())
      ... # doctest: +ELLIPSIS
      jema bench_scale: median of 1 runs; ...
      | (g) EMA update, 8-device mesh | ... | collectives in the step: none |  |  |
      0
    """
    parser = bench_parser("jema bench-scale", __doc__.splitlines()[0], repeats=10)
    parser.add_argument("--width", type=positive_int, default=1536, help="MLP width for (e)")
    parser.add_argument("--batch", type=positive_int, default=64, help="batch size for (e)")
    parser.add_argument("--sharded-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sharded_only:
        for row in _sharded_rows(args.params, args.leaves, args.repeats):
            print(f"{row.name}\t{row.ms}\t{row.rate}")
        return 0
    _run(args.repeats, args.width, args.batch, args.params, args.leaves)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
