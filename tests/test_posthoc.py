"""Post-hoc EMA: snapshots, the least-squares weights and the reconstruction, against EDM2's
numbers (POSTHOC-FACTS.md), closed forms and numpy replays."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jema
from jema import posthoc
from jema._power import SIGMA_REL_MAX, SIGMA_REL_MIN
from jema._snapshot_folder import FORMAT, STORAGE_DTYPES, _check_metadata
from jema.checkpoint import save

WIDTHS = (0.05, 0.10)
# Relative L2 error EDM2's own code reaches on the 1000-element random walk (POSTHOC-FACTS.md).
EDM2_ERRORS = {
    None: {0.03: 9.0e-4, 0.07: 5.6e-5, 0.12: 4.4e-5, 0.15: 1.5e-4},
    "float16": {0.03: 1.3e-3, 0.07: 1.8e-4, 0.12: 2.0e-4, 0.15: 2.3e-4},
}


def post_step_update(tx):
    """``tx.update`` that makes the params themselves the post-step weights (zero updates)."""
    return jax.jit(lambda state, p: tx.update(jax.tree.map(jnp.zeros_like, p), state, p)[1])


def direct_power_ema(walk: np.ndarray, sigma_rel: float) -> np.ndarray:
    """The EMA of width ``sigma_rel`` after every row of ``walk``, replayed in float64."""
    gamma = jema.sigma_rel_to_gamma(sigma_rel)
    ema = np.zeros(walk.shape[1])
    for t, theta in enumerate(walk.astype(np.float64), start=1):
        beta = (1 - 1 / t) ** (gamma + 1)
        ema = beta * ema + (1 - beta) * theta
    return ema


@pytest.fixture(scope="module")
def random_walk(tmp_path_factory):
    """EDM2's test: 2000 steps of a 1000-element random walk, snapshots every 100 steps, kept
    in float32 and in float16."""
    walk = np.cumsum(np.random.default_rng(0).standard_normal((2000, 1000)), axis=0)
    walk = walk.astype(np.float32)
    folders = {None: tmp_path_factory.mktemp("f32"), "float16": tmp_path_factory.mktemp("f16")}
    tx = jema.power_ema(WIDTHS)
    update = post_step_update(tx)
    state = tx.init({"w": jnp.zeros(1000)})
    for t, theta in enumerate(walk, start=1):
        state = update(state, {"w": jnp.asarray(theta)})
        if t % 100 == 0:
            for dtype, folder in folders.items():
                posthoc.save_snapshot(folder, state, dtype=dtype)
    return walk, folders


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_random_walk_reaches_edm2s_accuracy_at_each_target(random_walk, dtype):
    walk, folders = random_walk
    targets = sorted(EDM2_ERRORS[dtype])
    with pytest.warns(posthoc.ExtrapolationWarning, match=r"sigma_rel=0.03 is narrower"):
        trees = posthoc.reconstruct(folders[dtype], targets)
    for target, tree in zip(targets, trees, strict=True):
        direct = direct_power_ema(walk, target)
        error = np.linalg.norm(tree["w"] - direct) / np.linalg.norm(direct)
        assert error <= 1.05 * EDM2_ERRORS[dtype][target], (target, error)
        assert tree["w"].dtype == np.float32


def test_snapshots_are_listed_with_exact_steps_widths_and_dtype(random_walk):
    _, folders = random_walk
    listed = posthoc.list_snapshots(folders["float16"])
    assert [s.step for s in listed] == list(range(100, 2001, 100))
    assert {(s.sigma_rels, s.dtype, s.batch_stats) for s in listed} == {(WIDTHS, "float16", False)}


def test_a_tracked_width_at_a_snapshot_step_returns_that_snapshot(tmp_path):
    tx = jema.power_ema(WIDTHS)
    update = post_step_update(tx)
    rng = np.random.default_rng(1)
    params = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.zeros(4)}}
    state, stored = tx.init(params), {}
    for t in range(1, 31):
        new = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
        state = update(state, new)
        if t % 10 == 0:
            posthoc.save_snapshot(tmp_path, state, dtype="bfloat16")
            stored[t] = {s: jema.ema_params(state, sigma_rel=s) for s in WIDTHS}
    for t in (10, 20, 30):
        for s in WIDTHS:
            got = posthoc.reconstruct(tmp_path, s, step=t)
            want = jax.tree.map(
                lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), stored[t][s]
            )
            jax.tree.map(np.testing.assert_array_equal, got, want)
            stored_tree = posthoc.load_snapshot(tmp_path, t, s)
            assert stored_tree["a"].dtype == ml_dtypes.bfloat16
            jax.tree.map(np.testing.assert_array_equal, stored_tree, want)
    narrow = posthoc.reconstruct(tmp_path, 0.05, step=30, dtype=jnp.bfloat16)
    assert narrow["b"]["c"].dtype == jnp.bfloat16


def test_a_constant_trajectory_reconstructs_exactly(tmp_path):
    params = {"w": jnp.asarray(np.random.default_rng(2).normal(size=50), jnp.float32)}
    tx = jema.power_ema(WIDTHS)
    update = post_step_update(tx)
    state = tx.init(params)
    for t in range(1, 401):
        state = update(state, params)
        if t % 40 == 0:
            posthoc.save_snapshot(tmp_path, state)
    targets = [0.02, 0.07, 0.2, 0.28]
    with pytest.warns(posthoc.ExtrapolationWarning):
        trees = posthoc.reconstruct(tmp_path, targets, step=360)
    for tree in trees:
        np.testing.assert_allclose(tree["w"], params["w"], rtol=2e-6)


def test_batch_statistics_are_snapshotted_and_reconstructed_like_the_weights(tmp_path):
    tx = jema.power_ema(WIDTHS)
    params, stats = {"w": jnp.ones(3)}, {"mean": jnp.zeros(3)}
    state = jema.attach_batch_stats(tx.init(params), stats)
    update = jax.jit(
        lambda s, p, b: tx.update(jax.tree.map(jnp.zeros_like, p), s, p, batch_stats=b)
    )
    for t in range(1, 401):
        _, state = update(state, params, {"mean": jnp.full(3, float(t))})
        if t % 40 == 0:
            posthoc.save_snapshot(tmp_path, state)
    assert all(s.batch_stats for s in posthoc.list_snapshots(tmp_path))
    got = posthoc.reconstruct(tmp_path, 0.1, part="batch_stats")
    np.testing.assert_array_equal(got["mean"], jema.ema_batch_stats(state, sigma_rel=0.1)["mean"])
    ramp = posthoc.reconstruct(tmp_path, 0.07, part="batch_stats")["mean"]
    direct = direct_power_ema(np.arange(1.0, 401.0)[:, None], 0.07)
    np.testing.assert_allclose(ramp, direct[0], rtol=2e-4)  # measured 1.2e-4


@pytest.mark.parametrize("params_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_snapshots_reconstruct_a_width_between_the_tracked_ones(tmp_path, params_dtype):
    """ml_dtypes' bfloat16 is floating (numpy's issubdtype says it is not): its snapshots are
    averaged like float32 ones, whether stored as bfloat16 or saved from bfloat16 params."""
    tx = jema.power_ema(WIDTHS)
    update = post_step_update(tx)
    state = tx.init({"w": jnp.zeros(3, params_dtype)})
    folders = {"bf16": tmp_path / "bf16", "f32": tmp_path / "f32"}
    for t in range(1, 401):
        state = update(state, {"w": jnp.full(3, t, params_dtype)})
        if t % 40 == 0:
            posthoc.save_snapshot(folders["bf16"], state, dtype="bfloat16")
            posthoc.save_snapshot(folders["f32"], state, dtype="float32")
    direct = direct_power_ema(np.arange(1.0, 401.0)[:, None], 0.07)[0]
    from_f32 = posthoc.reconstruct(folders["f32"], 0.07, dtype="float32")["w"]
    got = posthoc.reconstruct(folders["bf16"], 0.07, dtype="float32")["w"]
    assert got.dtype == np.float32
    if params_dtype == jnp.bfloat16:  # the EMA itself is bfloat16: both folders hold its bits
        np.testing.assert_allclose(got, from_f32, rtol=1e-6)
    else:  # bfloat16 keeps 8 bits: each stored EMA is off by at most 2**-9 of itself
        np.testing.assert_allclose(got, from_f32, rtol=2**-8)
        np.testing.assert_allclose(got, direct, rtol=2**-8)
    last_width = float(np.asarray(jema.ema_params(state, sigma_rel=0.1)["w"], np.float32)[0])
    assert abs(got[0] - last_width) > 5  # not the last snapshot's last width passed through
    default = posthoc.reconstruct(folders["bf16"], 0.07)["w"]
    assert default.dtype == np.dtype(params_dtype)


def test_float8_snapshots_are_averaged_as_the_weights_say(tmp_path):
    """An EMA held in float8 is snapshotted as it is and averaged in float32: the
    reconstruction is the weighted sum of the stored float8 values (a numpy replay)."""
    tx = jema.power_ema(WIDTHS)
    update = post_step_update(tx)
    state = tx.init({"w": jnp.zeros(3)})
    folders = {"f8": tmp_path / "f8", "f32": tmp_path / "f32"}
    for t in range(1, 401):
        state = update(state, {"w": jnp.full(3, float(t))})
        if t % 40 == 0:
            f8 = jax.tree.map(lambda x: x.astype(jnp.float8_e4m3fn), state.emas)
            posthoc.save_snapshot(folders["f8"], state._replace(emas=f8))
            posthoc.save_snapshot(folders["f32"], state)
    got = posthoc.reconstruct(folders["f8"], 0.07, dtype="float32")["w"]
    rows = [(t, s) for t in range(40, 401, 40) for s in WIDTHS]
    weights = posthoc.solve_weights([t for t, _ in rows], [s for _, s in rows], 400, 0.07)[:, 0]
    stored = [posthoc.load_snapshot(folders["f8"], t, s)["w"] for t, s in rows]
    assert {x.dtype for x in stored} == {np.dtype(ml_dtypes.float8_e4m3fn)}
    replay = sum(w * x.astype(np.float64) for w, x in zip(weights, stored, strict=True))
    np.testing.assert_allclose(got, replay, rtol=1e-6)
    # each stored value is off by at most 2**-4 of itself (3 mantissa bits)
    bound = np.abs(weights).sum() * 2**-4
    np.testing.assert_allclose(got, posthoc.reconstruct(folders["f32"], 0.07)["w"], rtol=bound)
    assert posthoc.reconstruct(folders["f8"], 0.07)["w"].dtype == ml_dtypes.float8_e4m3fn


@pytest.mark.parametrize("big", [65520.0, -1e6, 3e38])
def test_float16_storage_refuses_values_it_would_turn_into_inf(tmp_path, one_step_state, big):
    w = jnp.asarray([1.0, big, 65504.0])
    state = one_step_state[1]
    state = state._replace(emas={k: {"w": w} for k in state.emas})
    message = f"params-0.05['w'] holds values up to {abs(big):g}, past float16's largest 65504"
    with pytest.raises(ValueError, match=re.escape(message) + ": .* would become inf"):
        posthoc.save_snapshot(tmp_path / "f16", state, dtype="float16")
    assert not (tmp_path / "f16").exists()
    posthoc.save_snapshot(tmp_path / "bf16", state, dtype="bfloat16")
    stored = posthoc.load_snapshot(tmp_path / "bf16", 1, 0.1)["w"].astype(np.float32)
    np.testing.assert_allclose(stored, w, rtol=2**-8)
    inf = state._replace(emas={k: {"w": jnp.asarray([1.0, np.inf, 65504.0])} for k in state.emas})
    posthoc.save_snapshot(tmp_path / "inf", inf, dtype="float16")  # inf already: kept as it is
    assert posthoc.load_snapshot(tmp_path / "inf", 1, 0.1)["w"].tolist() == [1.0, np.inf, 65504.0]


def test_the_tree_comes_back_as_nested_dicts_with_non_floating_leaves_kept(tmp_path):
    params = {"layers": [{"k": jnp.ones(2)}, {"k": jnp.ones(2)}], "n": jnp.arange(3)}
    tx = jema.power_ema((0.1,))
    state = post_step_update(tx)(tx.init(params), params)
    posthoc.save_snapshot(tmp_path, state, dtype=np.float16)
    got = posthoc.reconstruct(tmp_path, 0.1)
    assert sorted(got) == ["layers", "n"] and sorted(got["layers"]) == [0, 1]
    np.testing.assert_array_equal(got["layers"][1]["k"], [1.0, 1.0])
    assert got["n"].dtype == np.int32 and got["n"].tolist() == [0, 1, 2]


def test_inner_products_match_numerical_integration_of_the_profiles():
    for (t_a, s_a), (t_b, s_b) in [((300, 0.05), (700, 0.1)), ((700, 0.2), (300, 0.03))]:
        tau = np.linspace(0, min(t_a, t_b), 1_000_001)  # the product is 0 after the earlier end
        product = posthoc.profile(tau, t_a, s_a) * posthoc.profile(tau, t_b, s_b)
        g_a, g_b = jema.sigma_rel_to_gamma(s_a), jema.sigma_rel_to_gamma(s_b)
        closed = posthoc._inner(t_a, g_a, t_b, g_b)
        assert closed == pytest.approx(np.trapezoid(product, tau), rel=1e-6)
    assert np.trapezoid(posthoc.profile(tau, 300, 0.1), tau) == pytest.approx(1.0, rel=1e-6)


snapshot_grids = st.lists(
    st.tuples(st.integers(1, 10**5), st.sampled_from((0.05, 0.1, 0.15))),
    min_size=1,
    max_size=12,
    unique=True,
)


@given(
    snapshot_grids,
    st.floats(0.5, 2.0),
    st.lists(st.floats(0.01, 0.28), min_size=1, max_size=4),
)
def test_solved_weights_sum_to_one_per_target(snapshots, later, targets):
    steps = [t for t, _ in snapshots]
    widths = [s for _, s in snapshots]
    target_step = max(1, int(later * max(steps)))
    if min(steps) > target_step:
        with pytest.raises(ValueError, match="no snapshot at or before target_step"):
            posthoc.solve_weights(steps, widths, target_step, targets)
        return
    weights = posthoc.solve_weights(steps, widths, target_step, targets)
    assert weights.shape == (len(steps), len(targets)) and weights.dtype == np.float64
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-9)
    assert not weights[np.array(steps) > target_step].any()


@given(
    st.lists(st.integers(1, 10**4), min_size=1, max_size=8, unique=True),
    st.floats(0.03, 0.25),
    st.integers(2, 1000),
)
def test_solved_weights_do_not_depend_on_the_time_unit(steps, target, unit):
    widths = [(0.05, 0.1)[i % 2] for i in range(len(steps))]
    at = max(steps)
    scaled = posthoc.solve_weights([unit * t for t in steps], widths, unit * at, target)
    np.testing.assert_allclose(
        scaled, posthoc.solve_weights(steps, widths, at, target), rtol=1e-5, atol=1e-6
    )


@given(snapshot_grids, st.sampled_from(["float64", "jnp", "tuple"]))
def test_solved_weights_take_steps_as_integral_floats_and_arrays(snapshots, kind):
    steps = [t for t, _ in snapshots]
    widths = [s for _, s in snapshots]
    at = max(steps)
    given_as = {
        "float64": lambda: (np.asarray(steps, np.float64), np.float64(at)),
        "jnp": lambda: (jnp.asarray(steps), jnp.asarray(at)),
        "tuple": lambda: (tuple(np.int64(t) for t in steps), np.int64(at)),
    }[kind]()
    np.testing.assert_array_equal(
        posthoc.solve_weights(given_as[0], np.asarray(widths), given_as[1], np.asarray(0.07)),
        posthoc.solve_weights(steps, widths, at, 0.07),
    )


@given(st.integers(1, 10**6), st.floats(0.01, 0.99))
def test_solve_weights_refuses_steps_that_are_not_whole(step, fraction):
    with pytest.raises(ValueError, match="snapshot_steps must hold positive ints"):
        posthoc.solve_weights(np.asarray([step + fraction]), [0.05], step + 1, 0.07)


def test_one_snapshot_gets_all_the_weight_and_a_tracked_target_its_own_snapshot():
    assert posthoc.solve_weights([100], [0.05], 100, [0.03, 0.2]).tolist() == [[1.0, 1.0]]
    weights = posthoc.solve_weights([10, 10, 20, 20, 30], [0.05, 0.1] * 2 + [0.1], 20, 0.05)
    assert weights.ravel().tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([1, 2], [0.05], 2, 0.1), "must be non-empty and of one length; got 2 steps and 1"),
        (([], [], 2, 0.1), "must be non-empty"),
        (([0], [0.05], 2, 0.1), "snapshot_steps must hold positive ints .*; got 0"),
        (([2.5], [0.05], 2, 0.1), "snapshot_steps must hold positive ints .*; got 2.5"),
        (([True], [0.05], 2, 0.1), "snapshot_steps must hold positive ints .*; got True"),
        (([1], [0.3], 2, 0.1), r"snapshot_sigma_rels\[0\] must be a number in \[1e-38, 0.2887\)"),
        (([1], [0.05], 2, math.nan), r"target_sigma_rels\[0\] must be a number in \[1e-38, 0.2887"),
        (([1], [0.05], 2, []), "target_sigma_rels must name at least one width"),
        (([1], [0.05], 0, 0.1), "target_step must hold positive ints .*; got 0"),
        (([5, 7], [0.05, 0.1], 4, 0.1), "no snapshot at or before target_step 4; the earliest"),
        (([1], [0.05], 10**6, 0.01), r"do not reach the profile of sigma_rel \[0.01\]"),
    ],
)
def test_solve_weights_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        posthoc.solve_weights(*args)


@pytest.mark.parametrize(
    "as_given",
    [
        lambda steps, widths, target, s: (np.asarray(steps, np.float64), widths, target, s),
        lambda steps, widths, target, s: (jnp.asarray(steps), widths, jnp.asarray(target), s),
        lambda steps, widths, target, s: (steps, np.asarray(widths), np.float64(target), s),
        lambda steps, widths, target, s: (tuple(steps), widths, target, np.asarray(s)),
    ],
    ids=["edm2-float-steps", "jnp-int-arrays", "numpy-widths", "0-d-target"],
)
def test_solve_weights_takes_edm2s_float_steps_any_array_likes_and_0d_values(as_given):
    steps, widths, target, s = [100, 100, 200, 200], [0.05, 0.1, 0.05, 0.1], 200, 0.07
    expected = posthoc.solve_weights(steps, widths, target, s)
    np.testing.assert_array_equal(
        posthoc.solve_weights(*as_given(steps, widths, target, s)), expected
    )


@pytest.mark.parametrize("tiny", [1e-155, 1e-300, 5e-39, 0.0, -0.1])
def test_too_narrow_a_width_is_a_value_error_naming_sigma_rel(tiny):
    with pytest.raises(ValueError, match=r"sigma_rel must be a number in \[1e-38, 0.2887\)"):
        jema.sigma_rel_to_gamma(tiny)


@given(s=st.floats(SIGMA_REL_MIN, SIGMA_REL_MAX, exclude_max=True))
def test_sigma_rel_to_gamma_and_back_is_the_identity(s):
    assert jema.gamma_to_sigma_rel(jema.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)


def test_a_step_between_snapshots_is_refused_not_answered_for_the_earlier_one(tmp_path):
    tx = jema.power_ema(WIDTHS)
    update = post_step_update(tx)
    state = tx.init({"w": jnp.zeros(2)})
    for t in range(1, 201):
        state = update(state, {"w": jnp.full(2, float(t))})
        if t % 100 == 0:
            posthoc.save_snapshot(tmp_path, state)
    with pytest.raises(ValueError, match=r"no snapshot at step 150; saved steps: \[100, 200\]"):
        posthoc.reconstruct(tmp_path, 0.07, step=150)
    np.testing.assert_array_equal(
        posthoc.reconstruct(tmp_path, 0.07, step=np.float64(100.0))["w"],
        posthoc.reconstruct(tmp_path, 0.07, step=100)["w"],
    )


@pytest.fixture
def one_step_state():
    tx = optax.chain(optax.sgd(0.1), jema.power_ema(WIDTHS))
    params = {"w": jnp.ones(3)}
    _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    return state


def steps_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name[0].isdigit())


def test_save_snapshot_refuses_bad_input_and_writes_nothing(tmp_path, one_step_state):
    folder = tmp_path / "snaps"
    cases = [
        ({"dtype": "float64"}, ValueError, r"dtype must be None or one of \('float16'"),
        ({"dtype": jnp.int8}, ValueError, "dtype must be None or one of"),
        ({"dtype": "float8_e4m3fn"}, ValueError, "dtype must be None or one of"),
        ({"dtype": "nope"}, ValueError, "got 'nope'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            posthoc.save_snapshot(folder, one_step_state, **kwargs)
    tx = jema.with_ema(optax.sgd(0.1))
    with pytest.raises(TypeError, match="needs the power EMA of jema.power_ema"):
        posthoc.save_snapshot(folder, tx.init({"w": jnp.ones(3)}))
    fresh = jema.power_ema(WIDTHS).init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="has averaged no optimizer step yet"):
        posthoc.save_snapshot(folder, fresh)
    with pytest.raises(TypeError, match="directory must be a path"):
        posthoc.save_snapshot(3, one_step_state)
    assert not folder.exists()
    file = tmp_path / "a-file"
    file.write_text("mine")
    with pytest.raises(NotADirectoryError, match="is a file"):
        posthoc.save_snapshot(file, one_step_state)
    assert file.read_text() == "mine"


def test_an_existing_or_earlier_step_is_refused_and_the_folder_kept(tmp_path, one_step_state):
    posthoc.save_snapshot(tmp_path, one_step_state, dtype="float16")
    with pytest.raises(ValueError, match=r"snapshot step 1 already exists in .*; orbax would"):
        posthoc.save_snapshot(tmp_path, one_step_state)
    later = one_step_state[1]._replace(count=jnp.asarray(5, jnp.int32))
    posthoc.save_snapshot(tmp_path, later)
    with pytest.raises(ValueError, match=r"snapshot step 1 already exists"):
        posthoc.save_snapshot(tmp_path, one_step_state)
    assert [(s.step, s.dtype) for s in posthoc.list_snapshots(tmp_path)] == [
        (1, "float16"),
        (5, None),
    ]
    assert steps_in(tmp_path) == ["1", "5"]


def test_reconstruct_refuses_bad_folders_steps_and_arguments(tmp_path, one_step_state):
    with pytest.raises(FileNotFoundError, match="no snapshot folder"):
        posthoc.reconstruct(tmp_path / "nowhere", 0.07)
    with pytest.raises(FileNotFoundError, match="no snapshot folder"):
        posthoc.list_snapshots(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(FileNotFoundError, match="no snapshot in"):
        posthoc.reconstruct(tmp_path, 0.07)
    later = one_step_state[1]._replace(count=jnp.asarray(8, jnp.int32))
    posthoc.save_snapshot(tmp_path, later)
    for kwargs, message in [
        ({"step": 7}, r"no snapshot at step 7; saved steps: \[8\]"),
        ({"step": 0}, "step must hold positive ints"),
        ({"dtype": "int32"}, "dtype must be a floating dtype such as 'float32'; got 'int32'"),
        ({"dtype": "nope"}, "dtype must be a floating dtype"),
        ({"part": "ema"}, r"part must be one of \('params', 'batch_stats'\); got 'ema'"),
        ({"part": "batch_stats"}, "hold no batch statistics"),
    ]:
        with pytest.raises(ValueError, match=message):
            posthoc.reconstruct(tmp_path, 0.07, **kwargs)
    with pytest.raises(ValueError, match=r"sigma_rel must be a number in \[1e-38, 0.2887\)"):
        posthoc.reconstruct(tmp_path, [0.07, 0.5])
    with pytest.raises(FileNotFoundError, match=r"no snapshot step 7 in .*; saved steps: \[8\]"):
        posthoc.load_snapshot(tmp_path, 7, 0.05)
    with pytest.raises(ValueError, match=r"snapshot 8 holds sigma_rel \[0.05, 0.1\]; got 0.07"):
        posthoc.load_snapshot(tmp_path, 8, 0.07)
    with pytest.raises(ValueError, match="hold no batch statistics"):
        posthoc.load_snapshot(tmp_path, 8, 0.05, part="batch_stats")
    with pytest.raises(ValueError, match="step must hold positive ints .*; got '8'"):
        posthoc.load_snapshot(tmp_path, "8", 0.05)
    np.testing.assert_array_equal(
        posthoc.load_snapshot(tmp_path, np.float64(8.0), 0.05)["w"],
        posthoc.load_snapshot(tmp_path, 8, 0.05)["w"],
    )


def test_snapshots_of_different_trees_are_refused(tmp_path, one_step_state):
    posthoc.save_snapshot(tmp_path, one_step_state)
    tx = jema.power_ema(WIDTHS)
    other = {"w": jnp.ones(4), "extra": jnp.ones(1)}
    state = post_step_update(tx)(tx.init(other), other)
    posthoc.save_snapshot(tmp_path, state._replace(count=jnp.asarray(2, jnp.int32)))
    with pytest.raises(ValueError, match=r"different trees .*steps 1 and 2 differ in params "):
        posthoc.reconstruct(tmp_path, 0.07)
    np.testing.assert_allclose(posthoc.reconstruct(tmp_path, 0.1, step=1)["w"], 0.9, rtol=1e-7)


def saved_at(folder, state, steps):
    """Snapshots of ``state`` at ``steps`` (its count set to each)."""
    for step in steps:
        posthoc.save_snapshot(folder, state._replace(count=jnp.asarray(step, jnp.int32)))


def metadata_file(folder, step):
    return folder / str(step) / "metadata" / "metadata"


def test_a_folder_of_other_checkpoints_holds_no_snapshot(tmp_path, one_step_state):
    save(tmp_path, 3, {"w": jnp.ones(2)})
    assert posthoc.list_snapshots(tmp_path) == []
    with pytest.raises(FileNotFoundError, match=r"no snapshot in .* step folders \['3'\] hold no"):
        posthoc.reconstruct(tmp_path, 0.07)
    saved_at(tmp_path, one_step_state[1], [5])
    assert [s.step for s in posthoc.list_snapshots(tmp_path)] == [5]


@pytest.mark.parametrize(("source", "copy"), [(20, 25), (30, 40)], ids=["cp-r-20-25", "30-in-40"])
def test_metadata_of_another_step_than_its_folder_is_refused_naming_the_folder(
    tmp_path, one_step_state, source, copy
):
    saved_at(tmp_path, one_step_state[1], [10, 20, 30])
    shutil.copytree(tmp_path / str(source), tmp_path / str(copy))
    message = rf"snapshot folder '.*{os.sep}{copy}' holds the metadata of step {source} "
    for call in (
        lambda: posthoc.list_snapshots(tmp_path),
        lambda: posthoc.reconstruct(tmp_path, 0.07),
        lambda: posthoc.load_snapshot(tmp_path, copy, 0.05),
    ):
        with pytest.raises(ValueError, match=message):
            call()


def test_foreign_folders_are_left_alone_by_listing_reconstructing_and_saving(
    tmp_path, one_step_state
):
    state = one_step_state[1]
    saved_at(tmp_path, state, [10, 20])
    want = posthoc.reconstruct(tmp_path, 0.07)["w"]
    (tmp_path / "5").mkdir()  # empty
    (tmp_path / "99").mkdir()
    (tmp_path / "99" / "notes.txt").write_text("not a snapshot")
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "metadata").mkdir()  # a name that is no step: never read
    (tmp_path / "007").mkdir()
    (tmp_path / "README").write_text("mine")
    assert [s.step for s in posthoc.list_snapshots(tmp_path)] == [10, 20]
    np.testing.assert_array_equal(posthoc.reconstruct(tmp_path, 0.07)["w"], want)
    saved_at(tmp_path, state, [30, 100])  # 99 does not block later saves
    assert [s.step for s in posthoc.list_snapshots(tmp_path)] == [10, 20, 30, 100]
    with pytest.raises(FileNotFoundError, match=r"no snapshot step 99 .*\[10, 20, 30, 100\]"):
        posthoc.load_snapshot(tmp_path, 99, 0.05)
    with pytest.raises(ValueError, match="snapshot step 5 is below saved steps"):
        saved_at(tmp_path, state, [5])
    other = tmp_path / "other"
    saved_at(other, state, [10])
    (other / "99").mkdir()
    with pytest.raises(ValueError, match=r"'.*99' is in the way of snapshot step 99: it holds no"):
        saved_at(other, state, [99])
    assert list((other / "99").iterdir()) == [] and (tmp_path / "99" / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == [
        "007", "10", "100", "20", "30", "5", "99"
    ]  # fmt: skip


def test_damaged_snapshot_folders_are_refused_naming_them(tmp_path, one_step_state):
    saved_at(tmp_path, one_step_state[1], [10, 20])
    shutil.copytree(tmp_path / "20", tmp_path / "030")
    with pytest.raises(ValueError, match=r"folder '.*030' is not named by its step: .*'30'"):
        posthoc.list_snapshots(tmp_path)
    shutil.rmtree(tmp_path / "030")
    shutil.rmtree(tmp_path / "20" / "params-0.05")
    with pytest.raises(ValueError, match=r"'.*20' lacks the items \['params-0.05'\] its metadata"):
        posthoc.reconstruct(tmp_path, 0.07)
    shutil.rmtree(tmp_path / "20" / "metadata")
    with pytest.raises(ValueError, match=r"folder '.*20' holds stored trees but no 'metadata'"):
        posthoc.list_snapshots(tmp_path)
    with pytest.raises(ValueError, match="snapshot step 15 is below saved steps"):
        saved_at(tmp_path, one_step_state[1], [15])  # a damaged snapshot is still a snapshot


def broken(field, value):
    """A metadata edit: ``field`` set to ``value`` (deleted for ``...``)."""

    def edit(metadata):
        if value is ...:
            del metadata[field]
        else:
            metadata[field] = value
        return metadata

    return edit


def first_record(**changes):
    def edit(metadata):
        metadata["params"][0] = {**metadata["params"][0], **changes}
        return metadata

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("{not json", "cannot read the snapshot metadata"),
        ("", "cannot read the snapshot metadata"),
        (lambda m: [m], "is not a jema snapshot's metadata"),
        (broken("format", "jema.posthoc/0"), "is not a jema snapshot's metadata"),
        (broken("step", ...), "fields .*; a snapshot's are"),
        (broken("extra", 1), "fields .*; a snapshot's are"),
        (broken("step", "20"), "step '20' is not a positive int"),
        (broken("step", 20.0), "step 20.0 is not a positive int"),
        (broken("step", True), "step True is not a positive int"),
        (broken("step", -20), "step -20 is not a positive int"),
        (broken("sigma_rels", ...), "fields"),
        (broken("sigma_rels", []), r"sigma_rels \[\] is not a non-empty list"),
        (broken("sigma_rels", 0.05), "sigma_rels 0.05 is not a non-empty list"),
        (broken("sigma_rels", [0.05, 0.05]), r"sigma_rels \[0.05, 0.05\] repeat a width"),
        (broken("sigma_rels", ["0.05"]), "sigma_rel must be a number; got '0.05'"),
        (broken("sigma_rels", [0.05, None]), "sigma_rel must be a number; got None"),
        (broken("sigma_rels", [0.5]), r"sigma_rel must be a number in \[1e-38"),
        (broken("dtype", "float64"), "dtype 'float64' is not null or one of"),
        (broken("dtype", 16), "dtype 16 is not null or one of"),
        (broken("params", ...), "fields"),
        (broken("params", {"w": 1}), "params {'w': 1} is not a list of leaf records"),
        (broken("params", [7]), "params record 7 is not a dict of"),
        (broken("batch_stats", None), "batch_stats None is not a list of leaf records"),
        (first_record(shape=None), "shape is not a list of sizes"),
        (first_record(shape=[-3]), "shape is not a list of sizes"),
        (first_record(shape=[3.0]), "shape is not a list of sizes"),
        (first_record(path="w"), "path is not a list of str and int keys"),
        (first_record(path=[None]), "path is not a list of str and int keys"),
        (first_record(dtype="nope"), "dtype is not a dtype's name"),
        (first_record(dtype=["float32"]), "dtype is not a dtype's name"),
        (first_record(extra=1), "is not a dict of"),
        (lambda m: {**m, "params": m["params"] * 2}, r"leaf paths \[\('w',\)\] repeat"),
        (lambda m: {**m, "params": [*m["params"], {**m["params"][0], "path": ["w", "x"]}]},
         r"leaf paths \[\('w',\)\] repeat or lie inside"),
    ],
)  # fmt: skip
def test_hand_broken_metadata_is_a_value_error_naming_the_file(
    tmp_path, one_step_state, edit, message
):
    saved_at(tmp_path, one_step_state[1], [10, 20])
    file = metadata_file(tmp_path, 20)
    text = edit if isinstance(edit, str) else json.dumps(edit(json.loads(file.read_text())))
    file.write_text(text)
    where = re.escape(repr(str(file)))
    for call in (
        lambda: posthoc.list_snapshots(tmp_path),
        lambda: posthoc.reconstruct(tmp_path, 0.07, step=20),
        lambda: posthoc.load_snapshot(tmp_path, 20, 0.05),
    ):
        with pytest.raises(ValueError, match=f"{where}.*{message}|{message}.*{where}"):
            call()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
leaf_records = st.lists(
    st.fixed_dictionaries(
        {
            "path": st.lists(st.text(max_size=3) | st.integers(0, 9), min_size=2, max_size=2),
            "shape": st.lists(st.integers(0, 5), max_size=3),
            "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int32", "bool"]),
        }
    ),
    max_size=4,
    unique_by=lambda record: str(record["path"]),
)
valid_metadata = st.fixed_dictionaries(
    {
        "format": st.just(FORMAT),
        "step": st.integers(1, 10**12),
        "sigma_rels": st.lists(st.floats(SIGMA_REL_MIN, 0.28), min_size=1, max_size=3, unique=True),
        "dtype": st.sampled_from([None, *STORAGE_DTYPES]),
        "params": leaf_records,
    },
    optional={"batch_stats": leaf_records},
)


@given(valid_metadata)
def test_the_metadata_schema_takes_every_metadata_save_snapshot_writes(metadata):
    folder = os.path.join("snapshots", str(metadata["step"]))
    assert _check_metadata(metadata, metadata["step"], folder) is metadata
    with pytest.raises(ValueError, match=f"folder {re.escape(repr(folder))} holds the metadata"):
        _check_metadata(metadata, metadata["step"] + 1, folder)


@given(valid_metadata, st.data())
def test_a_broken_metadata_field_is_only_ever_a_value_error_naming_the_file(metadata, data):
    field = data.draw(st.sampled_from([*metadata, "params.path", "params.shape", "params.dtype"]))
    value = data.draw(json_values)
    if field.startswith("params.") and metadata["params"]:
        metadata["params"][0][field.split(".")[1]] = value
    elif not field.startswith("params."):
        metadata[field] = value
    folder = os.path.join("snapshots", "7")
    try:
        checked = _check_metadata(metadata, 7, folder)
    except ValueError as e:
        assert repr(os.path.join(folder, "metadata", "metadata")) in str(e) or repr(folder) in str(
            e
        )
    else:
        assert checked["step"] == 7 and checked["sigma_rels"]


@given(json_values)
def test_json_without_the_format_is_not_a_snapshots_metadata(value):
    with pytest.raises(ValueError, match="is not a jema snapshot's metadata"):
        _check_metadata(value, 1, "1")


MEASURE = """
import sys
from jema import posthoc
from jema._power import SIGMA_REL_MAX, SIGMA_REL_MIN

def kib(field):  # this process's resident memory (VmRSS) or its peak since a reset (VmHWM)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))

posthoc.reconstruct(sys.argv[1], 0.07)  # warm-up: imports, orbax's threads
before = kib("VmRSS:")
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # reset the peak to what is resident now, so earlier peaks do not count
tree = posthoc.reconstruct(sys.argv[2], 0.07)
grown = 1024 * (kib("VmHWM:") - before)
print(grown / sum(x.nbytes for x in tree.values()))
"""

WRITE = """
import sys, jax, jax.numpy as jnp, numpy as np, jema
from jema import posthoc
from jema._power import SIGMA_REL_MAX, SIGMA_REL_MIN
n, leaves = int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
params = {f"w{i}": jnp.asarray(rng.standard_normal(n // leaves, np.float32)) for i in range(leaves)}
tx = jema.power_ema((0.05, 0.10))
_, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
posthoc.save_snapshot(sys.argv[1], state)
"""


def test_reconstruct_streams_in_at_most_three_times_the_trees_size(tmp_path):
    python = [sys.executable, "-c"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name, size in (("small", 1000), ("big", 25_000_000)):  # 100 MB of float32
        command = [*python, WRITE, str(tmp_path / name), str(size), "10"]
        subprocess.run(command, check=True, env=env, capture_output=True)
    command = [*python, MEASURE, str(tmp_path / "small"), str(tmp_path / "big")]
    done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    ratio = float(done.stdout.split()[-1])
    assert 0 < ratio <= 3.0, ratio


def test_reconstruct_warns_only_when_extrapolating(random_walk):
    _, folders = random_walk
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        posthoc.reconstruct(folders[None], 0.05, step=1000)
    with pytest.warns(posthoc.ExtrapolationWarning, match=r"narrowest 0.05\)"):
        posthoc.reconstruct(folders[None], 0.049)
