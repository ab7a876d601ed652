"""every_k_steps (decay d**k on every k-th step, work skipped between) and skip_nonfinite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jema
from tests.sg_reference import sg_threshold


def replay_every_k(initial, trajectory, decay, k):
    ema = np.array(initial, copy=True)
    for step, weights in enumerate(trajectory, start=1):
        if step % k == 0:
            d = sg_threshold(decay, step) ** k
            ema = ema * d + (1.0 - d) * weights
    return ema


def feed(tx, initial, trajectory, **extra):
    state = tx.init(initial)
    update = jax.jit(tx.update)
    for weights in trajectory:
        _, state = update(jnp.zeros_like(weights), state, weights, **extra)
    return state


@given(k=st.integers(1, 6), decay=st.floats(0.5, 0.999), seed=st.integers(0, 2**16))
def test_every_k_steps_matches_a_numpy_replay(k, decay, seed):
    rng = np.random.default_rng(seed)
    initial = rng.normal(size=4).astype(np.float32)
    trajectory = list(initial + np.cumsum(rng.normal(size=(13, 4)), axis=0).astype(np.float32))
    state = feed(jema.ema_transform(decay, "threshold", every_k_steps=k), initial, trajectory)
    expected = replay_every_k(initial, trajectory, decay, k)
    np.testing.assert_allclose(jema.ema_params(state), expected, rtol=2e-6, atol=1e-6)
    assert int(jema.ema_count(state)) == len(trajectory)


def test_every_k_steps_keeps_the_averaging_window():
    k, decay = 8, 0.99
    trajectory = [np.ones(1, np.float32)] * 64
    dense = feed(jema.ema_transform(decay, "constant"), np.zeros(1, np.float32), trajectory)
    sparse = feed(
        jema.ema_transform(decay, "constant", every_k_steps=k), np.zeros(1, np.float32), trajectory
    )
    np.testing.assert_allclose(jema.ema_params(sparse), jema.ema_params(dense), rtol=1e-6)


def test_every_k_steps_skips_the_work_with_a_conditional():
    tx = jema.ema_transform(0.9, every_k_steps=4)
    params = jnp.zeros(8)
    hlo = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
    assert "stablehlo.case" in hlo or "conditional" in hlo
    dense = jema.ema_transform(0.9)
    assert (
        "stablehlo.case"
        not in jax.jit(dense.update).lower(params, dense.init(params), params).as_text()
    )


@pytest.mark.parametrize("static_args", [(), "every_k_steps"])
def test_every_k_steps_under_inject_hyperparams(static_args):
    tx = optax.inject_hyperparams(jema.ema_transform, static_args=static_args)(
        decay=0.5, decay_type="constant", every_k_steps=2
    )
    trajectory = [np.full(2, float(i), np.float32) for i in range(1, 5)]
    state = feed(tx, np.zeros(2, np.float32), trajectory)
    d = 0.25
    expected = (0.0 * d + (1 - d) * 2.0) * d + (1 - d) * 4.0
    np.testing.assert_allclose(jema.ema_params(state), expected, rtol=1e-6)
    plain = feed(jema.ema_transform(0.5, "constant", every_k_steps=2), np.zeros(2), trajectory)
    np.testing.assert_array_equal(jema.ema_params(state), jema.ema_params(plain))


@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("k", [0, -3])
@pytest.mark.parametrize("factory", [jema.ema_transform, jema.power_ema])
def test_a_bad_every_k_steps_injected_at_run_time_turns_the_ema_into_nan(
    k, factory, skip_nonfinite
):
    """Under jit nothing can raise; k = 0 would freeze the EMA and k = -3 corrupt it (an EMA
    of -20 from weights 2..6), so the EMA becomes NaN instead: never a plausible wrong value."""
    first = {"decay": 0.5} if factory is jema.ema_transform else {"sigma_rels": (0.1, 0.2)}
    tx = optax.inject_hyperparams(factory, static_args="skip_nonfinite")(
        **first, every_k_steps=2, skip_nonfinite=skip_nonfinite
    )
    state = tx.init(jnp.zeros(2))
    state.hyperparams["every_k_steps"] = jnp.asarray(k)
    update = jax.jit(tx.update)
    for w in range(2, 7):
        _, state = update(jnp.zeros(2), state, jnp.full(2, float(w)))
    emas = state.inner_state.ema if factory is jema.ema_transform else state.inner_state.emas
    assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(emas))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_skip_nonfinite_keeps_the_ema_and_its_count(bad):
    tx = jema.ema_transform(0.5, "threshold", skip_nonfinite=True)
    good1, broken, good2 = (
        np.ones(2, np.float32),
        np.array([bad, 1.0], np.float32),
        np.full(2, 3.0, np.float32),
    )
    state = feed(tx, np.zeros(2, np.float32), [good1, broken, good2])
    assert int(jema.ema_count(state)) == 2
    expected = replay_every_k(np.zeros(2, np.float32), [good1, good2], 0.5, 1)
    np.testing.assert_allclose(jema.ema_params(state), expected, rtol=1e-6)


def test_skip_nonfinite_looks_at_batch_stats_too():
    tx = jema.ema_transform(0.5, "constant", skip_nonfinite=True)
    params = jnp.ones(2)
    state = jema.attach_batch_stats(tx.init(params), {"var": jnp.ones(2)})
    _, state = jax.jit(tx.update)(
        jnp.zeros(2), state, params, batch_stats={"var": jnp.array([jnp.nan, 1.0])}
    )
    assert int(jema.ema_count(state)) == 0
    np.testing.assert_array_equal(jema.ema_batch_stats(state)["var"], [1.0, 1.0])


def test_without_skip_nonfinite_a_nan_reaches_the_ema():
    state = feed(
        jema.ema_transform(0.5, "constant"),
        np.zeros(2, np.float32),
        [np.array([np.nan, 1.0], np.float32)],
    )
    assert np.isnan(np.asarray(jema.ema_params(state))[0])


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "2", jnp.ones(2, jnp.int32)])
def test_every_k_steps_must_be_a_positive_int(k):
    with pytest.raises(
        ValueError, match="every_k_steps must be a positive int at most 2147483647 .*; got"
    ):
        jema.ema_transform(every_k_steps=k)


def test_skip_nonfinite_must_be_a_bool():
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False; got 'yes'"):
        jema.ema_transform(skip_nonfinite="yes")


@pytest.mark.parametrize("dtype", [jnp.int32, "not-a-dtype", bool])
def test_ema_dtype_must_be_floating(dtype):
    with pytest.raises(
        ValueError, match="ema_dtype must be a floating dtype such as jnp.float32; got"
    ):
        jema.ema_transform(ema_dtype=dtype)


def test_skip_nonfinite_judges_the_new_weights_not_their_parts():
    tx = jema.ema_transform(0.5, "constant", skip_nonfinite=True)
    params = jnp.array([3e38, 1.0])
    _, state = jax.jit(tx.update)(jnp.array([3e38, 0.0]), tx.init(params), params)  # overflows
    assert int(jema.ema_count(state)) == 0
    np.testing.assert_array_equal(jema.ema_params(state), params)


class OvershootsAfter3(jema.IDecayFunction):
    """A valid decay up to total_steps=3, then d = 1.5: out of [0, 1], a poisoned EMA."""

    def __call__(self, decay, step, total_steps):
        return jnp.where(step > total_steps, 1.5, decay)


@pytest.mark.parametrize("every_k_steps", [1, 2])
def test_skip_nonfinite_skips_a_step_whose_decay_is_out_of_range(every_k_steps):
    jema.EMA_DECAY_FUNCTIONS["overshoots"] = OvershootsAfter3
    try:
        tx = jema.ema_transform(
            0.5, "overshoots", total_steps=3, skip_nonfinite=True, every_k_steps=every_k_steps
        )
        trajectory = [np.full(2, float(i), np.float32) for i in range(1, 7)]
        state = feed(tx, np.zeros(2, np.float32), trajectory)
        unguarded = jema.ema_transform(
            0.5, "overshoots", total_steps=3, every_k_steps=every_k_steps
        )
        poisoned = feed(unguarded, np.zeros(2, np.float32), trajectory)
    finally:
        del jema.EMA_DECAY_FUNCTIONS["overshoots"]
    expected = np.zeros(2)
    for step, weights in enumerate(trajectory[:3], start=1):
        if step % every_k_steps == 0:
            expected = expected * 0.5**every_k_steps + (1 - 0.5**every_k_steps) * weights
    assert int(jema.ema_count(state)) == 3
    np.testing.assert_allclose(jema.ema_params(state), expected, rtol=1e-6)
    assert not np.allclose(jema.ema_params(poisoned), expected)  # what the guard prevents
