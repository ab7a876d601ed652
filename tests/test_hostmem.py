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
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import pytest

import jema
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


# On one device jax pairs each donated input with the first output of its shape and dtype,
# whatever its memory kind (mlir._set_up_aliases, without out_shardings): a donated host EMA
# then backs a device output and XLA aborts the process. Donating the whole state in the order
# it is returned, or giving in_shardings and out_shardings, is safe.
SAFE = ["none", "params", "both", "opt_state_with_shardings"]
ABORTS = ["opt_state", "opt_state_by_name", "both_returned_swapped"]


def test_every_donation_pattern_is_listed():
    assert sorted(SAFE + ABORTS) == sorted(DONATIONS)


@pytest.mark.parametrize("pattern", SAFE)
def test_safe_donations_keep_the_ema_in_host_memory_with_the_same_values(pattern):
    done = run_donation(pattern)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "kinds": ["pinned_host"],
        "difference": 0.0,
    }


@pytest.mark.parametrize("pattern", ABORTS)
def test_donating_the_host_ema_without_its_outputs_order_still_aborts_in_xla(pattern):
    # A fact about jax (0.10.2 to 0.12), stated in the README; when this fails, jax fixed it.
    done = run_donation(pattern)
    assert done.returncode == -6, (done.returncode, done.stderr[-2000:])
    assert "PjRtBuffer's memory kind does not match sharding's memory kind" in done.stderr
