"""Facts about an EMA kept in host memory on a mesh of 4 CPU devices, printed as one JSON line
for test_hostmem.

Run as ``python tests/hostmem_checks.py [ckpt_dir]`` in a fresh process: it forces 4 host
devices before the CPU backend starts. Every fact is computed here and asserted in
``tests/test_hostmem.py``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jema
from tests.sharded_checks import COLLECTIVE

STEPS = 6
SCHEDULES = {
    "constant": {"decay": 0.9, "decay_type": "constant"},
    "threshold": {"decay": 0.99, "decay_type": "threshold"},
    "exp": {"decay": 0.99, "decay_type": "exp", "total_steps": STEPS},
    "warmup": {"decay": 0.99, "decay_type": "warmup"},
}


def placed(mesh: Any, dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Params (kernel over 'x' by rows, bias over 'x') and batch statistics, on the mesh."""
    specs = {"kernel": P("x", None), "bias": P("x")}
    values = {"kernel": np.arange(64.0).reshape(16, 4) / 64, "bias": np.linspace(-1, 1, 8)}
    params = {
        k: jax.device_put(jnp.asarray(v, dtype), NamedSharding(mesh, specs[k]))
        for k, v in values.items()
    }
    stats = {"mean": jax.device_put(jnp.zeros(8), NamedSharding(mesh, P("x")))}
    return params, stats


def layout(tree: Any) -> list[str]:
    """Each leaf's path, memory kind and partition spec, e.g. ``['b'] pinned_host P('x',)``."""
    return [
        f"{jax.tree_util.keystr(path)} {leaf.sharding.memory_kind} {leaf.sharding.spec}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    ]


def train(tx: Any, params: Any, stats: Any) -> tuple[Any, Any, Any, list[str]]:
    """A donated, jitted step of sgd + EMA, run STEPS times; returns the state and the HLO's
    collectives and the EMA's layout after init, after each step."""
    state = jema.attach_batch_stats(jax.jit(tx.init)(params), stats)
    layouts = [layout(jema.find_ema_state(state))]

    def step(params: Any, state: Any, stats: Any) -> tuple[Any, Any]:
        grads = jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)
        updates, state = tx.update(grads, state, params, batch_stats=stats)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    hlo = jitted.lower(params, state, stats).compile().as_text()
    for n in range(1, STEPS + 1):
        stats = jax.tree.map(lambda s, n=n: s + n, stats)
        params, state = jitted(params, state, stats)
        layouts.append(layout(jema.find_ema_state(state)))
    return params, state, sorted({m.group(1) for m in COLLECTIVE.finditer(hlo)}), layouts


def difference(a: Any, b: Any) -> float:
    """The largest absolute difference between two trees' leaves."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y)))) for x, y in pairs)


def compare(make: Any, mesh: Any, dtype: Any, sigma_rel: float | None = None) -> dict[str, Any]:
    """The host-memory EMA against the same EMA on the device, after STEPS donated steps."""
    params, stats = placed(mesh, dtype)
    on_device = train(make(None), *placed(mesh, dtype))[1]
    _, state, collectives, layouts = train(make("pinned_host"), params, stats)
    host = jema.find_ema_state(state)
    return {
        "difference": difference(
            jema.ema_params(state, sigma_rel), jema.ema_params(on_device, sigma_rel)
        ),
        "stats_difference": difference(
            jema.ema_batch_stats(state, sigma_rel), jema.ema_batch_stats(on_device, sigma_rel)
        ),
        "count": int(host.count),
        "collectives": collectives,
        "layouts": layouts,
        "expected_layout": [  # the EMA in host memory with the params' specs; the count stays
            line if line.startswith(".count") else line.replace(" device ", " pinned_host ")
            for line in layout(_like_state(host, params, stats))
        ],
    }


def _like_state(host: Any, params: Any, stats: Any) -> Any:
    """The device layout the EMA state would have: the params' and statistics' shardings."""
    count = jnp.zeros([], jnp.int32)
    if isinstance(host, jema.PowerEmaState):
        return jema.PowerEmaState(
            count, dict.fromkeys(host.emas, params), dict.fromkeys(host.emas, stats)
        )
    return jema.WeightEmaState(count, params, stats)


def eval_and_files(mesh: Any, folder: str) -> dict[str, Any]:
    """The EMA brought to the device for evaluation, and through orbax and interop."""
    params, stats = placed(mesh, jnp.float32)
    tx = jema.with_ema(optax.sgd(0.1), decay=0.9, ema_memory_kind="pinned_host")
    state = jema.TrainState.create(apply_fn=None, params=params, tx=tx, batch_stats=stats)
    state = jax.jit(lambda s: s.apply_gradients(grads=jax.tree.map(jnp.ones_like, s.params)))(state)
    variables = state.ema_variables()
    final = jema.finalize(state)
    jema.checkpoint.save(folder, 1, state)
    template = jema.TrainState.create(
        apply_fn=None, params=placed(mesh, jnp.float32)[0], tx=tx, batch_stats=stats
    )
    restored = jema.checkpoint.restore(folder, template)
    import interop

    path = os.path.join(folder, "ema.safetensors")
    interop.save_checkpoint(path, net={"params": params}, ema_net={"params": variables["params"]})
    loaded = interop.load_checkpoint(path, {"params": params})
    return {
        "eval_layout": layout(variables),
        "finalize_layout": layout({"params": final.params, "batch_stats": final.batch_stats}),
        "restored_layout": layout(jema.find_ema_state(restored.opt_state)),
        "restored_difference": difference(
            jema.ema_params(restored.opt_state), jema.ema_params(state.opt_state)
        ),
        "interop_difference": difference(loaded["params"], jema.ema_params(state.opt_state)),
    }


def resume_facts(mesh: Any, folder: str, kind: str | None) -> dict[str, Any]:
    """A TrainState on the mesh saved after a jitted step, restored into a fresh state and into
    a ``jax.eval_shape`` one (inside and outside ``jax.set_mesh``), then stepped again: the
    restored layout, and each resumed step against the uninterrupted one."""
    tx = jema.with_ema(optax.sgd(0.1), decay=0.9, ema_memory_kind=kind)

    def fresh() -> Any:
        return jema.TrainState.create(apply_fn=None, params=placed(mesh, jnp.float32)[0], tx=tx)

    step = jax.jit(lambda s: s.apply_gradients(grads=jax.tree.map(jnp.sin, s.params)))
    state = step(fresh())
    path = os.path.join(folder, f"resume-{kind}")
    jema.checkpoint.save(path, 1, state)
    expected = step(state)
    out: dict[str, Any] = {}
    with jax.set_mesh(mesh):
        templates = {"fresh": fresh(), "eval_shape": jax.eval_shape(fresh)}
        for name, template in templates.items():
            restored = jema.checkpoint.restore(path, template)
            out[name] = {
                "layout": layout({"step": restored.step, "opt_state": restored.opt_state}),
                "difference": difference(step(restored), expected),
            }
    try:
        jema.checkpoint.restore(path, jax.eval_shape(fresh))
        out["outside_set_mesh"] = "restored"
    except ValueError as e:
        out["outside_set_mesh"] = str(e)
    return out


def nnx_facts() -> dict[str, Any]:
    """An nnx.Optimizer whose EMA lives in host memory: its layout and values after a step."""
    from flax import nnx

    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    tx = jema.with_ema(
        optax.sgd(0.1), decay=0.5, decay_type="constant", ema_memory_kind="pinned_host"
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = np.asarray(model.kernel[...])
    grads = nnx.grad(lambda m: m(jnp.ones((1, 4))).sum())(model)
    jema.nnx.update(optimizer, model, grads)
    ema = jema.ema_params(optimizer.opt_state)
    with jema.nnx.ema_weights(optimizer, model):
        inside = np.asarray(model.kernel[...])
        inside_kind = model.kernel[...].sharding.memory_kind
    return {
        "kind": ema["kernel"].sharding.memory_kind,
        "difference": float(
            np.max(
                np.abs(np.asarray(ema["kernel"]) - 0.5 * (before + np.asarray(model.kernel[...])))
            )
        ),
        "inside_kind": inside_kind,
        "inside_matches": bool(np.array_equal(inside, np.asarray(ema["kernel"]))),
    }


def main(folder: str) -> None:
    """Print one JSON line of facts."""
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("x",))
    out: dict[str, Any] = {}
    with jax.set_mesh(mesh):
        for name, options in SCHEDULES.items():
            for k in (1, 3):
                out[f"{name}_k{k}"] = compare(
                    lambda kind, o=options, k=k: jema.ema_transform(
                        **o, every_k_steps=k, ema_memory_kind=kind
                    ),
                    mesh,
                    jnp.float32,
                )
        out["bf16_float32_ema"] = compare(
            lambda kind: jema.ema_transform(0.9, ema_dtype=jnp.float32, ema_memory_kind=kind),
            mesh,
            jnp.bfloat16,
        )
        out["skip_nonfinite"] = compare(
            lambda kind: jema.ema_transform(0.9, skip_nonfinite=True, ema_memory_kind=kind),
            mesh,
            jnp.float32,
        )
        out["power_ema"] = compare(
            lambda kind: jema.power_ema((0.05, 0.10), every_k_steps=3, ema_memory_kind=kind),
            mesh,
            jnp.float32,
            sigma_rel=0.10,
        )
        out["files"] = eval_and_files(mesh, folder)
    out["nnx"] = nnx_facts()
    out["resume"] = {str(kind): resume_facts(mesh, folder, kind) for kind in (None, "pinned_host")}
    json.dump(out, sys.stdout)
    print()


DONATIONS = {  # how a step(params, opt_state) -> (params, opt_state) is jitted
    "none": {},
    "params": {"donate_argnums": (0,)},
    "both": {"donate_argnums": (0, 1)},
    "opt_state": {"donate_argnums": (1,)},
    "opt_state_by_name": {"donate_argnames": ("opt_state",)},
    "both_returned_swapped": {"donate_argnums": (0, 1)},
    "opt_state_with_shardings": {"donate_argnums": (1,)},
    "update_alone": {"donate_argnums": (1,)},  # jax.jit(tx.update), its updates returned
    "new_state_dropped": {"donate_argnums": (1,)},  # the new params kept, the old state passed on
}


def donated_run(pattern: str, kind: str | None) -> Any:
    """Three sgd-with-momentum + EMA steps on one device, jitted as ``DONATIONS[pattern]``."""
    tx = jema.with_ema(
        optax.sgd(0.1, momentum=0.9), decay=0.5, decay_type="constant", ema_memory_kind=kind
    )
    params = {"k": jax.device_put(jnp.arange(32.0).reshape(8, 4) / 32, jax.devices()[0])}
    opt_state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), tx.init(params))
    swapped = pattern == "both_returned_swapped"

    def grads_at(params: Any) -> Any:
        return jax.tree.map(lambda p: jnp.sin(p) + 0.1, params)

    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        updates, new_state = tx.update(grads_at(params), opt_state, params)
        new = optax.apply_updates(params, updates)
        if pattern == "new_state_dropped":
            return new, opt_state
        return (new_state, new) if swapped else (new, new_state)

    options: dict[str, Any] = dict(DONATIONS[pattern])
    if pattern == "opt_state_with_shardings":
        shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
        options.update(in_shardings=shardings, out_shardings=shardings)
    if pattern == "update_alone":
        update = jax.jit(tx.update, **options)
        for _ in range(3):
            updates, opt_state = update(grads_at(params), opt_state, params)
            params = optax.apply_updates(params, updates)
        return opt_state
    jitted = jax.jit(step, **options)
    for _ in range(3):
        a, b = jitted(params, opt_state)
        params, opt_state = (b, a) if swapped else (a, b)
    return opt_state


def donation_facts(pattern: str) -> dict[str, Any]:
    """The host-memory EMA after donated steps: its memory kinds, and its distance from the
    same steps with the EMA on the device."""
    host, device = donated_run(pattern, "pinned_host"), donated_run(pattern, None)
    return {
        "kinds": sorted(
            {leaf.sharding.memory_kind for leaf in jax.tree.leaves(jema.ema_params(host))}
        ),
        "difference": difference(jema.ema_params(host), jema.ema_params(device)),
    }


if __name__ == "__main__":
    # Read when the CPU backend starts, i.e. at the first jax call in main(), not at import.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    if sys.argv[1] == "--donation":
        json.dump(donation_facts(sys.argv[2]), sys.stdout)
        print()
    else:
        main(sys.argv[1])
