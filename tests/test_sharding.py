"""The EMA on a mesh of 8 CPU devices: it keeps the params' sharding, adds no collective and,
donated, no second copy of itself.

The facts are computed once by ``tests/sharded_checks.py`` in a subprocess (this process
already has jax with one device) for an FSDP-style layout (largest axis over 'data' of 8) and a
tensor-parallel-style one (Dense kernels and biases over 'model' of a 4x2 mesh), each with
Explicit and Auto mesh axes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).with_name("sharded_checks.py")
LAYOUTS = [(kind, axes) for kind in ("fsdp", "tp") for axes in ("Explicit", "Auto")]


@pytest.fixture(scope="module")
def facts() -> dict[str, Any]:
    """The JSON facts printed by ``sharded_checks.py``, run with 8 forced host devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("kind", "axes"), LAYOUTS)
@pytest.mark.parametrize("k", [1, 4])
def test_ema_has_the_params_sharding_after_init_and_every_step(facts, kind, axes, k):
    ema = facts[kind][axes][f"ema_k{k}"]
    assert ema["init"] == [], f"after jitted init + attach_batch_stats: {ema['init']}"
    for n, mismatches in enumerate(ema["steps"], 1):
        assert mismatches == [], f"after jitted step {n}: {mismatches}"
    assert ema["count"] == 3


@pytest.mark.parametrize(("kind", "axes"), LAYOUTS)
def test_adam_with_ema_keeps_the_params_sharding(facts, kind, axes):
    opt = facts[kind][axes]["optimizer"]
    assert opt["ema_vs_spec"] == [], "EMA differs from where the params were placed"
    assert opt["ema_vs_params"] == [], "EMA differs from the new params"


@pytest.mark.parametrize(("kind", "axes"), LAYOUTS)
def test_compiled_steps_have_no_collective(facts, kind, axes):
    layout = facts[kind][axes]
    assert layout["ema_k1"]["collectives"] == [], "EMA update alone"
    assert layout["ema_k4"]["collectives"] == [], "EMA update with every_k_steps=4 (a cond)"
    assert layout["optimizer"]["collectives"] == [], "adam + EMA on grads sharded like params"
    assert layout["optimizer"]["adam_collectives"] == []


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_collective_detector_sees_the_skip_nonfinite_all_reduce(facts, kind):
    # skip_nonfinite needs one global isfinite: a control that the HLO scan finds collectives.
    assert "all-reduce" in facts[kind]["Explicit"]["nonfinite_collectives"]


# On CPU, ``compiled.memory_analysis()`` reports per-device byte counts of XLA's buffer
# assignment: arguments, outputs, outputs aliased to donated arguments (written in place), and
# temporaries. A second copy of the EMA would show as an output that is not aliased to the
# donated state, or as an EMA-sized temporary.
@pytest.mark.parametrize(("kind", "axes"), LAYOUTS)
@pytest.mark.parametrize("k", [1, 4])
def test_donated_ema_step_allocates_no_second_copy(facts, kind, axes, k):
    ema = facts[kind][axes][f"ema_k{k}"]
    memory = ema["memory"]
    assert memory["alias"] == ema["state_bytes"], "the whole EMA state is updated in place"
    # What is left of the output is its tuple of leaf pointers (8 bytes each).
    assert memory["output"] - memory["alias"] <= 8 * ema["state_leaves"]
    # 0 for k=1; the cond of every_k_steps=4 keeps a few hundred bytes of scratch.
    assert memory["temp"] < ema["ema_bytes"] // 4, (memory, ema["ema_bytes"])


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_ema_adds_only_its_own_donated_bytes_to_an_adam_step(facts, kind):
    # Explicit axes: adam's state is sharded like the params, so the two steps compare cleanly
    # (with Auto axes adam's jitted init leaves mu and nu replicated, see sharded_checks.py).
    opt = facts[kind]["Explicit"]["optimizer"]
    with_ema, adam, ema_bytes = opt["memory"], opt["adam_memory"], opt["ema_bytes"]
    count_bytes = 4
    assert with_ema["argument"] - adam["argument"] == ema_bytes + count_bytes
    assert with_ema["alias"] - adam["alias"] == ema_bytes + count_bytes, "EMA written in place"
    assert with_ema["temp"] - adam["temp"] < ema_bytes // 4, "no EMA-sized temporary"


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_train_step_has_the_same_collectives_with_and_without_ema(facts, kind):
    train = facts[kind]["Auto"]["train"]
    assert train["collectives"] == train["plain_collectives"]
    assert train["count"] == 3


def test_fsdp_train_step_ema_follows_the_params(facts):
    for n, mismatches in enumerate(facts["fsdp"]["Auto"]["train"]["steps"], 1):
        assert mismatches == [], f"after train step {n}: {mismatches}"


@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_train_step_ema_follows_the_params_with_pinned_out_shardings(facts, kind):
    # With Auto axes an unconstrained output's sharding is XLA's choice (for tp it splits the
    # EMA of the replicated BatchNorm params over 'model', as it does adam's moments); pinning
    # the state's out_shardings, as the README advises, keeps the EMA on the params' layout.
    for n, mismatches in enumerate(facts[kind]["Auto"]["train"]["pinned_steps"], 1):
        assert mismatches == [], f"after train step {n}: {mismatches}"
