"""The EMA kept in host memory (``ema_memory_kind="pinned_host"``) on a mesh of 4 CPU devices:
the params' sharding in host memory after init, donated jitted steps and restore; the same
values as the EMA on the device for every decay type, every_k_steps, bf16 params, batch
statistics, power EMAs; no collective; brought to the device for evaluation.

The facts are computed once by ``tests/hostmem_checks.py`` in a subprocess (this process
already has jax with one device).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given

import jema
from jema._donation import keep_donations_in_their_memory
from jema._trees import place
from tests.hostmem_checks import DONATIONS

SCRIPT = Path(__file__).with_name("hostmem_checks.py")
ROOT = SCRIPT.parent.parent
CASES = [f"{name}_k{k}" for name in ("constant", "threshold", "exp", "warmup") for k in (1, 3)]
CASES += ["bf16_float32_ema", "skip_nonfinite", "power_ema"]


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict[str, Any]:
    """The JSON facts printed by ``hostmem_checks.py``, run with 4 forced host devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    folder = tmp_path_factory.mktemp("hostmem")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(folder)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_the_ema_lives_in_host_memory_with_the_params_sharding(facts, case):
    fact = facts[case]
    assert any("pinned_host P('x', None)" in line for line in fact["expected_layout"])
    for n, layout in enumerate(fact["layouts"]):
        assert layout == fact["expected_layout"], f"after {'init' if n == 0 else f'step {n}'}"


@pytest.mark.parametrize("case", CASES)
def test_values_equal_the_ema_on_the_device(facts, case):
    assert facts[case]["difference"] == 0.0
    assert facts[case]["stats_difference"] == 0.0
    assert facts[case]["count"] == 6


@pytest.mark.parametrize("case", CASES)
def test_the_update_gathers_nothing(facts, case):
    # skip_nonfinite's one small all-reduce is its global finiteness check, as on the device
    assert facts[case]["collectives"] == (["all-reduce"] if case == "skip_nonfinite" else [])


def test_evaluation_finalize_restore_and_interop(facts):
    files = facts["files"]
    on_device = ["['batch_stats']['mean'] device P('x',)", "['params']['bias'] device P('x',)"]
    assert files["eval_layout"][:2] == on_device
    assert files["finalize_layout"][:2] == on_device
    assert files["restored_layout"][1:] == [
        ".ema['bias'] pinned_host P('x',)",
        ".ema['kernel'] pinned_host P('x', None)",
        ".batch_stats['mean'] pinned_host P('x',)",
    ]
    assert files["restored_difference"] == 0.0 and files["interop_difference"] == 0.0


def test_nnx_optimizer_with_the_ema_in_host_memory(facts):
    assert facts["nnx"] == {
        "kind": "pinned_host",
        "difference": 0.0,
        "inside_kind": "device",
        "inside_matches": True,
    }


def test_an_unknown_memory_kind_lists_the_devices_kinds():
    with pytest.raises(
        ValueError,
        match=r"must be one of \['device', 'pinned_host'\] \(the devices list \[.*\].*got 'hbm'",
    ):
        jema.ema_transform(ema_memory_kind="hbm")
    with pytest.raises(ValueError, match="got 'unpinned_host'"):
        jema.power_ema(ema_memory_kind="unpinned_host")
    state = jema.ema_transform(ema_memory_kind="pinned_host").init({"w": jnp.ones(2)})
    assert jema.ema_params(state)["w"].sharding.memory_kind == "pinned_host"


def run_donation(pattern: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--donation", pattern],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("pattern", sorted(DONATIONS))
def test_every_donation_keeps_the_ema_in_host_memory_with_the_same_values(pattern):
    done = run_donation(pattern)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "kinds": ["pinned_host"],
        "difference": 0.0,
    }


def donations(lowered: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """The entry function's (argument kind, output kind) aliases and its XLA donors' kinds,
    read from the lowered program's text."""
    header = next(line for line in lowered.as_text().splitlines() if "@main(" in line)
    arguments, results = header.split(") -> (")

    def kind(attrs: str) -> str:
        found = re.search(r'mhlo.memory_kind = "(\w+)"', attrs)
        return found.group(1) if found else "device"

    outputs = [kind(attrs) for attrs in results.split("tensor<")[1:]]
    aliases, donors = [], []
    for attrs in re.split(r"%arg\d+: ", arguments)[1:]:
        alias = re.search(r"tf.aliasing_output = (\d+)", attrs)
        if alias:
            aliases.append((kind(attrs), outputs[int(alias.group(1))]))
        if "jax.buffer_donor = true" in attrs:
            donors.append(kind(attrs))
    return aliases, donors


def host_step(move: Any) -> Any:
    """A step taking (device, host) arrays of one shape, the host one donated, returning a
    device result before the host one (the order that made XLA abort)."""

    def step(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        return a * 2, move(b * 3)

    host = jax.device_put(jnp.ones(4), jax.memory.Space.Host)
    return jax.jit(step, donate_argnums=1).lower(jnp.ones(4), host)


def test_jax_pairs_a_donated_host_buffer_with_a_device_output():
    # The cause jema works around (mlir._set_up_aliases on one device without out_shardings);
    # when this fails, jax pairs by memory kind itself.
    to_host = host_step(lambda x: jax.device_put(x, jax.memory.Space.Host))
    assert donations(to_host) == ([("pinned_host", "device")], [])


def test_jema_hands_cross_memory_donations_to_xla():
    lowered = host_step(lambda x: place(x, jax.memory.Space.Host))
    assert donations(lowered) == ([], ["pinned_host"])


def test_a_donated_opt_state_keeps_same_memory_aliases_and_donates_the_host_ema():
    tx = jema.with_ema(optax.sgd(0.1, momentum=0.9), decay=0.5, ema_memory_kind="pinned_host")
    params = {"k": jnp.ones((8, 4))}

    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(params, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    lowered = jax.jit(step, donate_argnums=1).lower(params, tx.init(params))
    aliases, donors = donations(lowered)
    assert aliases == [("device", "device")] * 2 and donors == ["pinned_host"]


@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=8))
def test_keeping_donations_in_their_memory_changes_no_value_or_derivative(values):
    x = jnp.asarray(values, jnp.float32)
    tree = {"w": x, "none": None}
    assert jax.jit(keep_donations_in_their_memory)(tree)["w"].tolist() == x.tolist()
    assert keep_donations_in_their_memory(tree) is tree  # nothing traced: returned as is
    grad = jax.jit(jax.grad(lambda w: (keep_donations_in_their_memory(w) ** 2).sum()))(x)
    assert np.array_equal(np.asarray(grad), np.asarray(2 * x))
    batched = jax.vmap(lambda w: keep_donations_in_their_memory([w])[0] * 2)(x[:, None])
    assert np.array_equal(np.asarray(batched), np.asarray(2 * x[:, None]))


@pytest.mark.parametrize("kind", ["None", "pinned_host"])
@pytest.mark.parametrize("template", ["fresh", "eval_shape"])
def test_a_state_restored_on_the_mesh_steps_on_as_if_never_saved(facts, kind, template):
    fact = facts["resume"][kind][template]
    ema = "pinned_host" if kind == "pinned_host" else "device"
    # the counters replicated over the mesh, as jit places them, not committed to device 0
    assert fact["layout"] == [
        "['opt_state'][1].count device P()",
        f"['opt_state'][1].ema['bias'] {ema} P('x',)",
        f"['opt_state'][1].ema['kernel'] {ema} P('x', None)",
        "['step'] device P()",
    ]
    assert fact["difference"] == 0.0


def test_an_eval_shape_template_outside_its_mesh_is_refused_naming_the_leaf(facts):
    said = facts["resume"]["None"]["outside_set_mesh"]
    assert said.startswith("params/bias: the template's sharding NamedSharding(mesh=AbstractMesh")
    assert "restore inside `with jax.set_mesh(mesh):`" in said
