"""Decay schedules: closed forms, SG's class registry, the seed page's LinearDecay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jema
from tests.sg_reference import sg_constant, sg_exp, sg_threshold

decays = st.floats(min_value=1e-4, max_value=1 - 1e-4)
steps = st.integers(min_value=1, max_value=10**6)


class LinearDecay(jema.IDecayFunction):
    """The seed page's custom schedule, verbatim apart from the empty ``__init__`` body."""

    def __init__(self, **kwargs):
        pass

    def __call__(self, decay: float, step: int, total_steps: int) -> float:
        training_progress = step / total_steps
        return decay * training_progress


@pytest.fixture
def linear_registered():
    jema.EMA_DECAY_FUNCTIONS["linear"] = LinearDecay
    yield
    del jema.EMA_DECAY_FUNCTIONS["linear"]


@given(decay=decays, step=steps)
def test_threshold_matches_closed_form(decay, step):
    got = float(jema.threshold(decay, jnp.int32(step)))
    np.testing.assert_allclose(got, sg_threshold(decay, step), rtol=1e-6)


@given(decay=decays, step=steps, total=st.integers(1, 10**6), beta=st.floats(0.5, 50))
def test_exp_matches_closed_form(decay, step, total, beta):
    got = float(jema.exp(decay, jnp.int32(step), total, beta=beta))
    np.testing.assert_allclose(got, sg_exp(decay, step, total, beta), rtol=2e-5, atol=1e-7)


@given(decay=decays, step=steps)
def test_constant_is_decay(decay, step):
    np.testing.assert_allclose(
        float(jema.constant(decay, jnp.int32(step))), sg_constant(decay, step), rtol=1e-7
    )


def test_threshold_step_one_is_two_elevenths():
    assert float(jema.threshold(0.9999, 1)) == pytest.approx(2 / 11, rel=1e-7)


def test_schedules_over_a_step_array_match_numpy():
    step = jnp.arange(1, 2001)
    np.testing.assert_allclose(
        jema.threshold(0.999, step), np.minimum(0.999, (1 + step) / (10 + step)), rtol=1e-6
    )
    np.testing.assert_allclose(
        jema.exp(0.999, step, 2000, beta=15), 0.999 * (1 - np.exp(-15 * step / 2000)), rtol=1e-5
    )
    assert jema.constant(0.9, step).shape == step.shape


@given(decay=decays)
def test_schedules_never_exceed_decay_and_grow_with_step(decay):
    step = jnp.arange(1, 500)
    for fn in (jema.threshold, lambda d, s: jema.exp(d, s, 499)):
        d = np.asarray(fn(decay, step))
        assert np.all(d <= np.float32(decay) * (1 + 1e-7))
        assert np.all(np.diff(d) >= 0)


def test_schedules_jit_over_a_traced_step():
    step_fn = jax.jit(lambda s: jema.ExpDecay(beta=5)(0.99, s, 100))
    np.testing.assert_allclose(step_fn(jnp.int32(50)), sg_exp(0.99, 50, 100, beta=5), rtol=1e-6)


def test_registry_classes_match_functions():
    assert set(jema.EMA_DECAY_FUNCTIONS) == {"constant", "threshold", "exp", "warmup"}
    assert float(jema.EMA_DECAY_FUNCTIONS["threshold"]()(0.9, 3, None)) == pytest.approx(4 / 13)
    assert float(jema.EMA_DECAY_FUNCTIONS["constant"]()(0.9, 3, None)) == pytest.approx(0.9)
    assert float(jema.EMA_DECAY_FUNCTIONS["exp"](beta=2)(0.9, 3, 6)) == pytest.approx(
        sg_exp(0.9, 3, 6, 2)
    )


def test_linear_decay_from_the_seed_page_drives_ema_transform(linear_registered):
    tx = jema.ema_transform(0.9, decay_type="linear", total_steps=4)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    new = {"w": jnp.ones(3)}
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, new), state, new)
    d = 0.9 * 1 / 4
    np.testing.assert_allclose(jema.ema_params(state)["w"], (1 - d) * np.ones(3), rtol=1e-6)


def test_extra_kwargs_go_to_the_class_constructor():
    tx = jema.ema_transform(**{"decay": 0.9999, "decay_type": "exp", "beta": 15}, total_steps=100)
    params = {"w": jnp.ones(2)}
    _, state = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    d = sg_exp(0.9999, 1, 100, 15)
    np.testing.assert_allclose(jema.ema_params(state)["w"], d + (1 - d) * 2.0, rtol=1e-6)


def test_exp_takes_numpy_and_python_betas_alike():
    for beta in (2, 2.0, np.float32(2.0), np.int64(2)):
        assert float(jema.ExpDecay(beta=beta)(0.9, 3, 6)) == pytest.approx(sg_exp(0.9, 3, 6, 2.0))


@pytest.mark.parametrize("beta", [0, -1.0, float("nan"), float("inf"), "15", True])
def test_exp_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match=f"beta must be a positive finite number; got {beta!r}"):
        jema.ExpDecay(beta=beta)


@pytest.mark.parametrize("decay_type", ["constant", "threshold"])
def test_sg_configs_with_beta_work_for_every_decay_type(decay_type):
    params = jnp.zeros(2)
    sg = {"constant": sg_constant, "threshold": sg_threshold}[decay_type]
    for options in ({}, {"beta": 15}):
        tx = jema.ema_transform(0.99, decay_type, **options)
        _, state = tx.update(jnp.zeros(2), tx.init(params), jnp.ones(2))
        np.testing.assert_allclose(jema.ema_params(state), 1 - sg(0.99, 1), rtol=1e-6)


def test_builtin_schedules_reject_unknown_options():
    with pytest.raises(TypeError, match=r"'threshold' does not accept options \{'gamma': 2\}"):
        jema.ema_transform(decay_type="threshold", gamma=2)


@given(decay=decays, step=steps, total=st.integers(1, 10**6))
def test_complements_match_one_minus_the_float64_decay(decay, step, total):
    for name, sg in (("constant", sg_constant), ("threshold", sg_threshold), ("exp", sg_exp)):
        schedule = jema.EMA_DECAY_FUNCTIONS[name]()
        got = float(schedule.complement(decay, jnp.int32(step), total))
        np.testing.assert_allclose(got, 1.0 - sg(decay, step, total), rtol=2e-6, atol=1e-12)


@given(x=st.floats(allow_nan=True), low=st.floats(-10, 10), width=st.floats(0.1, 10))
def test_real_inside_is_the_open_interval_test(x, low, width):
    from jema._checks import real_inside

    high = low + width
    expected = x if low < x < high else None
    assert real_inside(x, low, high) == expected
    assert real_inside(np.float32(0.5), 0, 1) == 0.5 and real_inside(jnp.int32(3), 0, 4) == 3.0
    assert real_inside(True, 0, 2) is None and real_inside(np.ones(1), 0, 2) is None


@given(k=st.integers(-5, 10**6))
def test_every_k_steps_check_takes_positive_integers_only(k):
    from jema._schedules import check_every_k_steps

    if k >= 1:
        assert check_every_k_steps(k) == k == check_every_k_steps(np.int64(k))
    else:
        with pytest.raises(ValueError, match="every_k_steps must be a positive int"):
            check_every_k_steps(k)
    with pytest.raises(ValueError, match="every_k_steps must be a positive int"):
        check_every_k_steps(float(max(k, 1)))


@given(
    decay=decays,
    step=steps,
    k=st.integers(1, 64),
    decay_type=st.sampled_from(["constant", "threshold"]),
)
def test_every_k_weights_are_the_kth_power_and_its_complement(decay, step, k, decay_type):
    from jema._schedules import decay_weights_fn

    d, one_minus_d = decay_weights_fn(decay, decay_type, None, {}, k)(jnp.int32(step))
    base = sg_constant(decay, step) if decay_type == "constant" else sg_threshold(decay, step)
    np.testing.assert_allclose(float(d), base**k, rtol=2e-5, atol=1e-30)  # XLA flushes subnormals
    np.testing.assert_allclose(float(one_minus_d), -np.expm1(k * np.log(base)), rtol=2e-5)


@pytest.mark.parametrize(
    ("options", "step", "expected"),
    [  # timm's ModelEmaV3 values (POSTHOC-FACTS.md), decay 0.9999
        ({}, 1, 0.0),
        ({}, 2, 0.3700394750525634),
        ({}, 10, 0.7845565309968117),
        ({}, 100, 0.9535841116638722),
        ({}, 1000, 0.99),
        ({"power": 3 / 4}, 100, 0.9683772233983162),
        ({"update_after_step": 10}, 11, 0.0),
        ({"update_after_step": 10}, 100, 0.9502066139271426),
    ],
)
def test_warmup_matches_timms_numbers(options, step, expected):
    d, one_minus_d = jema.WarmupDecay(**options)._weights(0.9999, jnp.int32(step), None)
    np.testing.assert_allclose(float(d), expected, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(float(one_minus_d), 1 - expected, rtol=1e-6, atol=1e-7)


@given(
    decay=decays,
    step=steps,
    inv_gamma=st.floats(0.1, 100),
    power=st.floats(0.1, 2),
    min_decay=st.floats(0, 0.5),
    after=st.integers(0, 100),
)
def test_warmup_is_the_clipped_closed_form(decay, step, inv_gamma, power, min_decay, after):
    schedule = jema.WarmupDecay(inv_gamma, power, min_decay, after)
    s = max(0, step - after - 1)
    raw = 1 - (1 + s / inv_gamma) ** -power
    expected = 0.0 if s == 0 else min(max(raw, min_decay), decay)
    np.testing.assert_allclose(
        float(schedule(decay, jnp.int32(step), None)), expected, rtol=2e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"inv_gamma": 0}, "inv_gamma must be a positive number; got 0"),
        ({"power": -1}, "power must be a positive number; got -1"),
        ({"min_decay": 1.0}, r"min_decay must be a number in \[0, 1\); got 1.0"),
        ({"update_after_step": -1}, "update_after_step must be a non-negative int; got -1"),
        ({"update_after_step": 1.5}, "update_after_step must be a non-negative int; got 1.5"),
    ],
)
def test_warmup_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        jema.ema_transform(0.999, "warmup", **options)


@given(start=st.floats(0.1, 0.9), end=st.floats(0.1, 0.99), n=st.integers(1, 20))
def test_an_optax_schedule_as_decay_is_called_as_optax_calls_schedules(start, end, n):
    schedule = optax.linear_schedule(start, end, transition_steps=10)
    for decay_type, rule in (
        ("constant", lambda v, s: v),
        ("threshold", lambda v, s: min(v, (1 + s) / (10 + s))),
    ):
        tx = jema.ema_transform(schedule, decay_type)
        state = tx.init({"w": jnp.zeros(1)})
        expected = 0.0
        for step in range(1, n + 1):
            d = rule(float(schedule(step - 1)), step)  # optax's count is 0 at the first update
            expected = expected * d + (1 - d) * step
            _, state = tx.update({"w": jnp.zeros(1)}, state, {"w": jnp.full(1, float(step))})
        np.testing.assert_allclose(jema.ema_params(state)["w"], [expected], rtol=1e-5)
