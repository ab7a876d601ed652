"""Facts about the EMA on a mesh of 8 CPU devices, printed as one JSON line for test_sharding.

Run as ``python tests/sharded_checks.py`` in a fresh process: it forces 8 host devices before
the CPU backend starts (importing this module, e.g. for doctests, changes nothing). Every fact
is computed here and asserted in ``tests/test_sharding.py``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jema

COLLECTIVE = re.compile(
    r"\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all"
    r"|ragged-all-to-all|collective-broadcast)(-start)?\("
)
IN, HIDDEN, OUT, BATCH = 16, 64, 32, 32


class Mlp(nn.Module):
    """Dense, BatchNorm, Dense: params and batch_stats with an axis of 64 divisible by 8."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Dense(HIDDEN)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(OUT)(nn.relu(x))


def fsdp_spec(path: Any, leaf: Any) -> P:
    """FSDP-style: the largest axis of every leaf over 'data' (all 8 devices)."""
    spec = [None] * leaf.ndim
    spec[int(np.argmax(leaf.shape))] = "data"
    return P(*spec)


def tp_spec(path: Any, leaf: Any) -> P:
    """Tensor-parallel-style: Dense kernels and biases split on output features over 'model'."""
    names = [getattr(k, "key", None) for k in path]
    if any(str(n).startswith("Dense") for n in names):
        return P(None, "model") if names[-1] == "kernel" else P("model")
    return P()


MESHES = {"fsdp": ((8,), ("data",), fsdp_spec), "tp": ((4, 2), ("data", "model"), tp_spec)}


def collectives(compiled: Any) -> list[str]:
    """Names of the cross-device ops in a compiled computation's HLO text."""
    return sorted({m.group(1) for m in COLLECTIVE.finditer(compiled.as_text())})


def sharding_mismatches(tree: Any, expected: Any) -> list[str]:
    """Paths of ``tree`` whose sharding is not equivalent to the one in ``expected``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    wanted = jax.tree.leaves(expected)
    assert len(leaves) == len(wanted), (len(leaves), len(wanted))
    return [
        jax.tree_util.keystr(path) + f": {leaf.sharding.spec} != {want.spec}"
        for (path, leaf), want in zip(leaves, wanted, strict=True)
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim)
    ]


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree`` (every leaf evenly sharded or replicated)."""
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
    )


def memory(compiled: Any) -> dict[str, int]:
    """The per-device sizes XLA's buffer assignment reports for a compiled step."""
    m = compiled.memory_analysis()
    keys = ("argument", "output", "alias", "temp")
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in keys}


def setup(kind: str, axis_type: AxisType) -> dict[str, Any]:
    """A mesh, the model's variables placed on it, their shardings and a sharded batch."""
    shape, names, spec_fn = MESHES[kind]
    mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
    model = Mlp()
    variables = model.init(jax.random.key(0), jnp.zeros((1, IN)), train=False)
    shardings = jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_fn(p, x)), variables
    )
    variables = jax.device_put(variables, shardings)
    rng = np.random.default_rng(0)
    batch_sharding = NamedSharding(mesh, P("data"))
    x = jax.device_put(rng.normal(size=(BATCH, IN)).astype(np.float32), batch_sharding)
    y = jax.device_put(rng.integers(0, OUT, size=BATCH).astype(np.int32), batch_sharding)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), variables["params"])
    return dict(mesh=mesh, model=model, variables=variables, shardings=shardings, x=x, y=y, g=grads)


def ema_only_facts(s: dict[str, Any], every_k_steps: int) -> dict[str, Any]:
    """The EMA transform alone: jitted init + attach, 3 jitted donated steps, its HLO and memory."""
    tx = jema.ema_transform(0.9, "constant", every_k_steps=every_k_steps)
    params, stats = s["variables"]["params"], s["variables"]["batch_stats"]

    @jax.jit
    def init(params: Any, stats: Any) -> Any:
        return jema.attach_batch_stats(tx.init(params), stats)

    def step(grads: Any, state: Any, params: Any, stats: Any) -> Any:
        return tx.update(grads, state, params, batch_stats=stats)[1]

    state = init(params, stats)
    facts = {
        "init": sharding_mismatches(state.ema, s["shardings"]["params"])
        + sharding_mismatches(state.batch_stats, s["shardings"]["batch_stats"]),
        "steps": [],
    }
    compiled = jax.jit(step, donate_argnums=1).lower(s["g"], state, params, stats).compile()
    for _ in range(3):
        state = compiled(s["g"], state, params, stats)
        facts["steps"].append(
            sharding_mismatches(state.ema, s["shardings"]["params"])
            + sharding_mismatches(state.batch_stats, s["shardings"]["batch_stats"])
        )
    facts["count"] = int(state.count)
    facts["collectives"] = collectives(compiled)
    facts["memory"] = memory(compiled)
    facts["ema_bytes"] = shard_bytes((state.ema, state.batch_stats))
    facts["state_bytes"] = shard_bytes(state)
    facts["state_leaves"] = len(jax.tree.leaves(state))
    return facts


def optimizer_facts(s: dict[str, Any]) -> dict[str, Any]:
    """adam + EMA vs adam alone on grads sharded like the params: shardings, HLO, memory."""
    params = s["variables"]["params"]

    def compiled_step(tx: Any) -> tuple[Any, Any]:
        def step(grads: Any, params: Any, opt_state: Any) -> Any:
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        opt_state = jax.jit(tx.init)(params)
        compiled = jax.jit(step, donate_argnums=(1, 2)).lower(s["g"], params, opt_state).compile()
        new_params, new_state = compiled(s["g"], jax.tree.map(jnp.copy, params), opt_state)
        return compiled, (new_params, new_state)

    with_ema, (new_params, new_state) = compiled_step(jema.with_ema(optax.adam(1e-2)))
    adam, _ = compiled_step(optax.adam(1e-2))
    ema = jema.ema_params(new_state)
    return {
        "ema_vs_spec": sharding_mismatches(ema, s["shardings"]["params"]),
        "ema_vs_params": sharding_mismatches(ema, jax.tree.map(lambda x: x.sharding, new_params)),
        "collectives": collectives(with_ema),
        "adam_collectives": collectives(adam),
        "memory": memory(with_ema),
        "adam_memory": memory(adam),
        "ema_bytes": shard_bytes(ema),
    }


def train_facts(s: dict[str, Any]) -> dict[str, Any]:
    """A real jitted train step of the BatchNorm MLP: EMA shardings, collectives vs adam alone."""
    model, variables = s["model"], s["variables"]

    def compiled_step(tx: Any, ema: bool, pin: bool = False) -> tuple[Any, Any]:
        def step(params: Any, stats: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
            def loss_fn(params: Any) -> Any:
                logits, new = model.apply(
                    {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return loss, new["batch_stats"]

            grads, stats = jax.grad(loss_fn, has_aux=True)(params)
            kwargs = {"batch_stats": stats} if ema else {}
            updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
            # Keep the raw model where it was placed (Auto axes let XLA pick any sharding for
            # outputs); the EMA is left unconstrained, so it must follow by propagation.
            params, stats = jax.lax.with_sharding_constraint(
                (optax.apply_updates(params, updates), stats),
                (s["shardings"]["params"], s["shardings"]["batch_stats"]),
            )
            return params, stats, opt_state

        params, stats = variables["params"], variables["batch_stats"]
        init = (lambda p, st: jema.attach_batch_stats(tx.init(p), st)) if ema else tx.init
        state = (
            jax.tree.map(jnp.copy, params),
            jax.tree.map(jnp.copy, stats),
            jax.jit(init)(params, stats) if ema else jax.jit(init)(params),
        )
        # Pinned: every output keeps the sharding it came in with (the README's advice for
        # Auto axes, where XLA otherwise picks the sharding of unconstrained outputs).
        out_shardings = jax.tree.map(lambda x: x.sharding, state) if pin else None
        jitted = jax.jit(step, donate_argnums=(0, 1, 2), out_shardings=out_shardings)
        return jitted.lower(*state, s["x"], s["y"]).compile(), (jitted, state)

    def run_steps(jitted: Any, state: Any) -> tuple[list[list[str]], Any]:
        steps = []
        for _ in range(3):
            # jitted, not compiled: with Auto axes adam's jitted init leaves mu and nu
            # replicated (zeros are not propagated from the params); the first step shards them.
            state = jitted(*state, s["x"], s["y"])
            ema = {
                "params": jema.ema_params(state[2]),
                "batch_stats": jema.ema_batch_stats(state[2]),
            }
            raw = {"params": state[0], "batch_stats": state[1]}
            steps.append(sharding_mismatches(ema, jax.tree.map(lambda x: x.sharding, raw)))
        return steps, state

    compiled, (jitted, state) = compiled_step(jema.with_ema(optax.adam(1e-2)), True)
    plain_compiled, _ = compiled_step(optax.adam(1e-2), False)
    steps, state = run_steps(jitted, state)
    pinned_steps, _ = run_steps(*compiled_step(jema.with_ema(optax.adam(1e-2)), True, pin=True)[1])
    return {
        "steps": steps,
        "pinned_steps": pinned_steps,
        "count": int(jema.ema_count(state[2])),
        "collectives": _counts(compiled),
        "plain_collectives": _counts(plain_compiled),
    }


def _counts(compiled: Any) -> dict[str, int]:
    names = [m.group(1) for m in COLLECTIVE.finditer(compiled.as_text())]
    return {n: names.count(n) for n in sorted(set(names))}


def nonfinite_collectives(s: dict[str, Any]) -> list[str]:
    """Control: skip_nonfinite=True needs a global isfinite, so the detector must see a reduce."""
    tx = jema.ema_transform(0.9, "constant", skip_nonfinite=True)
    params = s["variables"]["params"]
    state = jax.jit(tx.init)(params)
    step = jax.jit(lambda g, st, p: tx.update(g, st, p)[1], donate_argnums=1)
    return collectives(step.lower(s["g"], state, params).compile())


def main() -> None:
    """Print one JSON line: {kind: {axis_type: facts}}."""
    assert jax.device_count() == 8, jax.devices()
    out: dict[str, Any] = {}
    for kind in MESHES:
        for axis_type in (AxisType.Explicit, AxisType.Auto):
            s = setup(kind, axis_type)
            with jax.set_mesh(s["mesh"]):  # Explicit axes need it (e.g. optax's jnp.zeros)
                facts = {f"ema_k{k}": ema_only_facts(s, k) for k in (1, 4)}
                facts["optimizer"] = optimizer_facts(s)
                if axis_type == AxisType.Explicit:
                    facts["nonfinite_collectives"] = nonfinite_collectives(s)
                else:  # flax's Dense needs sharding annotations to run with Explicit axes
                    facts["train"] = train_facts(s)
            out.setdefault(kind, {})[axis_type.name] = facts
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    # Read when the CPU backend starts, i.e. at the first jax call in main(), not at import.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    main()
