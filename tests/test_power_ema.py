"""power_ema: numpy replays of the fused update for 1, 2 and 3 widths and every_k_steps, the
readers' width selection, BatchNorm statistics, and the integrations (TrainState, nnx,
MultiSteps)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import jema
from jema.train_state import TrainState, finalize

FACT_GAMMAS = {0.05: 16.972198602303447, 0.10: 6.937203937601809, 0.15: 3.5578687748994646}


def replay(trajectory, sigma_rels, k=1):
    """float64 numpy: β = (1 - k/t)**(γ + 1) on every k-th step; the first averaging copies."""
    emas = {s: np.array(trajectory[0], np.float64) * np.nan for s in sigma_rels}
    for t, weights in enumerate(trajectory, start=1):
        if t % k:
            continue
        for s in sigma_rels:
            beta = (1 - k / t) ** (FACT_GAMMAS[s] + 1)
            emas[s] = weights if t == k else beta * emas[s] + (1 - beta) * weights
    return emas


def run(tx, trajectory, params=None):
    params = jnp.zeros_like(trajectory[0]) if params is None else params
    state = tx.init({"w": params})
    update = jax.jit(tx.update)
    for weights in trajectory:
        _, state = update({"w": jnp.zeros_like(weights)}, state, {"w": jnp.asarray(weights)})
    return state


@pytest.mark.parametrize("sigma_rels", [(0.05,), (0.05, 0.10), (0.05, 0.10, 0.15)])
@pytest.mark.parametrize("k", [1, 3])
def test_fused_update_matches_a_numpy_replay(sigma_rels, k):
    rng = np.random.default_rng(0)
    trajectory = np.cumsum(rng.standard_normal((60, 8)), axis=0).astype(np.float32)
    state = run(jema.power_ema(sigma_rels, every_k_steps=k), trajectory)
    expected = replay(trajectory.astype(np.float64), sigma_rels, k)
    assert int(jema.ema_count(state)) == 60
    for s in sigma_rels:
        np.testing.assert_allclose(jema.ema_params(state, sigma_rel=s)["w"], expected[s], rtol=2e-5)


@given(t=st.integers(1, 10**6), k=st.integers(1, 64), sigma_rel=st.sampled_from(list(FACT_GAMMAS)))
def test_power_weights_are_the_closed_form_without_cancellation(t, k, sigma_rel):
    from jema._power import power_weights

    t = k * ((t + k - 1) // k)  # the steps where the EMA averages
    beta, one_minus = (
        float(x) for x in power_weights(jnp.int32(t), (FACT_GAMMAS[sigma_rel],), k)[0]
    )
    with np.errstate(divide="ignore"):  # log1p(-1) = -inf at the first averaging step: β = 0
        exact = np.exp((FACT_GAMMAS[sigma_rel] + 1) * np.log1p(-k / t))
    np.testing.assert_allclose(beta, exact, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(
        one_minus, 1 - exact if t == k else -np.expm1(np.log(exact)), rtol=1e-5
    )


def test_bf16_params_with_a_float32_ema():
    trajectory = [np.full(4, 1 + i / 512, np.float32) for i in range(20)]
    tx = jema.power_ema((0.10,), ema_dtype=jnp.float32)
    state = tx.init({"w": jnp.zeros(4, jnp.bfloat16)})
    for weights in trajectory:
        _, state = tx.update(
            {"w": jnp.zeros(4, jnp.bfloat16)}, state, {"w": jnp.asarray(weights, jnp.bfloat16)}
        )
    got = jema.ema_params(state)["w"]
    assert got.dtype == jnp.float32
    bf16 = [np.asarray(jnp.asarray(w, jnp.bfloat16), np.float64) for w in trajectory]
    np.testing.assert_allclose(got, replay(bf16, (0.10,))[0.10], rtol=1e-6)


@pytest.mark.parametrize("ema_dtype", [None, jnp.float32])
def test_float8_params_average_in_float32(ema_dtype):
    fp8 = jnp.float8_e4m3fn
    trajectory = [np.linspace(-2, 2, 5) * (1 + i / 8) for i in range(12)]
    tx = jema.power_ema((0.10,), ema_dtype=ema_dtype)
    state = tx.init({"w": jnp.zeros(5, fp8)})
    state = jema.attach_batch_stats(state, {"mean": jnp.zeros(5, jnp.float32)})
    for weights in trajectory:
        params = {"w": jnp.asarray(weights, fp8)}
        stats = {"mean": jnp.asarray(weights, jnp.float32)}
        _, state = tx.update({"w": jnp.zeros(5, fp8)}, state, params, batch_stats=stats)
    got = jema.ema_params(state)["w"]
    assert got.dtype == (ema_dtype or fp8)
    assert jema.ema_batch_stats(state)["mean"].dtype == jnp.float32  # never narrowed to float8
    fp8_path = [np.asarray(jnp.asarray(w, fp8), np.float64) for w in trajectory]
    expected = replay(fp8_path, (0.10,))[0.10]
    if ema_dtype is None:  # each step rounds the EMA to float8: replay that rounding
        expected = np.asarray(fp8_path[0])
        for t, weights in enumerate(fp8_path[1:], start=2):
            beta = (1 - 1 / t) ** (FACT_GAMMAS[0.10] + 1)
            mixed = np.float32(beta) * expected.astype(np.float32) + np.float32(1 - beta) * weights
            expected = np.asarray(jnp.asarray(mixed.astype(np.float32), fp8), np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=1e-6)


def test_readers_pick_a_width_and_list_the_tracked_ones():
    state = jema.power_ema((0.10, 0.05)).init({"w": jnp.ones(2)})
    with pytest.raises(
        ValueError, match=r"tracks 2 widths \(sigma_rel 0\.05, 0\.1\); pass sigma_rel="
    ):
        jema.ema_params(state)
    with pytest.raises(ValueError, match=r"sigma_rel=0\.07 is not tracked; tracked: 0\.05, 0\.1\."):
        jema.ema_params(state, sigma_rel=0.07)
    with pytest.raises(ValueError, match=r"holds SuperGradients' EMA .* no widths"):
        jema.ema_params(jema.ema_transform().init({"w": jnp.ones(2)}), sigma_rel=0.05)
    assert jema.ema_params(state, sigma_rel=0.1)["w"].tolist() == [1.0, 1.0]
    assert int(jema.ema_count(state)) == 0


@pytest.mark.parametrize(
    ("sigma_rels", "message"),
    [
        ((), "non-empty sequence"),
        (0.05, "non-empty sequence"),
        ((0.05, 0.05), "distinct"),
        ((0.3,), r"^sigma_rels\[0\] must be a number in \[1e-38, 0\.2887\).*; got 0\.3$"),
        ((0.05, float("nan")), r"^sigma_rels\[1\] must be a number .*; got nan$"),
    ],
)
def test_bad_widths_are_refused(sigma_rels, message):
    with pytest.raises(ValueError, match=message):
        jema.power_ema(sigma_rels)


@pytest.mark.parametrize("narrowest", [1e-38, 1e-6])
def test_the_narrowest_widths_average_within_float32(narrowest):
    """γ ≈ 1/σ_rel stays a float32 number down to SIGMA_REL_MIN (no overflow warning, which
    pytest turns into an error): at t ≤ 60 such an EMA is the last step's weights."""
    from jema._power import SIGMA_REL_MIN

    assert narrowest >= SIGMA_REL_MIN
    trajectory = np.arange(1.0, 61.0, dtype=np.float32)[:, None] * np.ones(3, np.float32)
    state = run(jema.power_ema((narrowest, 0.10)), trajectory)
    assert jema.ema_params(state, sigma_rel=narrowest)["w"].tolist() == [60.0] * 3


def test_skip_nonfinite_keeps_the_emas_and_the_count():
    tx = jema.power_ema((0.05, 0.10), skip_nonfinite=True)
    good = [np.full(2, float(i), np.float32) for i in range(1, 5)]
    state = run(tx, [*good[:2], np.array([np.nan, 1.0], np.float32), *good[2:]])
    expected = replay(np.stack(good).astype(np.float64), (0.05, 0.10))
    assert int(jema.ema_count(state)) == 4
    for s in (0.05, 0.10):
        np.testing.assert_allclose(jema.ema_params(state, sigma_rel=s)["w"], expected[s], rtol=1e-6)


def test_batch_stats_are_averaged_per_width_with_its_decay():
    tx = jema.power_ema((0.05, 0.10))
    state = jema.attach_batch_stats(tx.init({"w": jnp.zeros(1)}), {"mean": jnp.zeros(3)})
    stats = [np.full(3, float(i)) for i in range(1, 7)]
    for value in stats:
        _, state = tx.update(
            {"w": jnp.zeros(1)},
            state,
            {"w": jnp.zeros(1)},
            batch_stats={"mean": jnp.asarray(value, jnp.float32)},
        )
    expected = replay(stats, (0.05, 0.10))
    for s in (0.05, 0.10):
        np.testing.assert_allclose(
            jema.ema_batch_stats(state, sigma_rel=s)["mean"], expected[s], rtol=1e-6
        )


def test_multisteps_counts_optimizer_steps():
    tx = optax.MultiSteps(optax.chain(optax.sgd(1.0), jema.power_ema((0.10,))), every_k_schedule=2)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for _ in range(6):
        updates, state = tx.update({"w": -jnp.ones(2)}, state, params)
        params = optax.apply_updates(params, updates)
    assert int(jema.ema_count(state)) == 3
    expected = replay([np.full(2, float(i)) for i in (1, 2, 3)], (0.10,))[0.10]
    np.testing.assert_allclose(jema.ema_params(state)["w"], expected, rtol=1e-6)


def test_train_state_reads_and_finalizes_a_width():
    tx = optax.chain(optax.sgd(1.0), jema.power_ema((0.05, 0.10)))
    state = TrainState.create(
        apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx, batch_stats={"m": jnp.zeros(2)}
    )
    for i in range(1, 4):
        state = state.apply_gradients(
            grads={"w": -jnp.ones(2)}, batch_stats={"m": jnp.full(2, float(i))}
        )
    expected = replay([np.full(2, float(i)) for i in (1, 2, 3)], (0.05,))[0.05]
    variables = state.ema_variables(sigma_rel=0.05)
    np.testing.assert_allclose(variables["params"]["w"], expected, rtol=1e-6)
    np.testing.assert_allclose(variables["batch_stats"]["m"], expected, rtol=1e-6)
    np.testing.assert_allclose(finalize(state, sigma_rel=0.05).params["w"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="pass sigma_rel="):
        state.ema_variables()


def test_nnx_evaluates_on_a_width():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, optax.chain(optax.sgd(0.1), jema.power_ema((0.05, 0.10))), wrt=nnx.Param
    )
    x = jnp.ones((1, 2))
    for _ in range(3):
        grads = nnx.grad(lambda m: m(x).sum())(model)
        jema.nnx.update(optimizer, model, grads)
    raw = np.asarray(model.kernel[...])
    ema = jema.ema_params(optimizer.opt_state, sigma_rel=0.10)["kernel"]
    assert not np.array_equal(raw, ema)
    with jema.nnx.ema_weights(optimizer, model, sigma_rel=0.10):
        np.testing.assert_array_equal(model.kernel[...], ema)
    np.testing.assert_array_equal(model.kernel[...], raw)


def test_donated_jitted_update_keeps_the_ema_buffers_in_place():
    tx = jema.power_ema((0.05, 0.10))
    params = {"w": jnp.ones(1024)}
    state = tx.init(params)
    update = jax.jit(lambda g, st, p: tx.update(g, st, p)[1], donate_argnums=1)
    pointers = [state.emas[k]["w"].unsafe_buffer_pointer() for k in sorted(state.emas)]
    state = update({"w": jnp.zeros(1024)}, state, params)
    assert [state.emas[k]["w"].unsafe_buffer_pointer() for k in sorted(state.emas)] == pointers
