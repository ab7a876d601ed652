"""Bad input gets a clear error naming the value and what is allowed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jema


@pytest.mark.parametrize(
    "decay", [0, 1, 0.0, 1.0, -0.5, 1.5, float("nan"), True, "0.9", None, [0.9], jnp.ones(2) * 0.5]
)
def test_decay_outside_the_open_unit_interval(decay):
    with pytest.raises(ValueError, match=r"decay must be a number strictly inside \(0, 1\); got"):
        jema.ema_transform(decay)


def test_unknown_decay_type_lists_the_registered_names():
    with pytest.raises(
        ValueError,
        match=r"unknown decay_type 'cosine'; registered: \['constant', 'exp', 'threshold', 'warmup'\]",  # noqa: E501
    ):
        jema.ema_transform(0.9, "cosine")


@pytest.mark.parametrize("total_steps", [0, -5, 2.5, float("inf"), True, "100"])
def test_total_steps_must_be_a_positive_whole_number(total_steps):
    with pytest.raises(ValueError, match="total_steps must be a"):
        jema.ema_transform(0.9, "exp", total_steps=total_steps)


def test_exp_without_total_steps():
    with pytest.raises(ValueError, match=r"decay_type='exp' needs total_steps.*got None"):
        jema.ema_transform(0.9, "exp")


def test_exp_with_non_positive_beta():
    with pytest.raises(ValueError, match=r"beta must be a positive finite number; got -2"):
        jema.ema_transform(0.9, "exp", total_steps=10, beta=-2)


class NumpyLinear(jema.IDecayFunction):
    def __call__(self, decay, step, total_steps):
        return decay * np.exp(-step / total_steps)


class Progress(jema.IDecayFunction):
    def __call__(self, decay, step, total_steps):
        return decay * step / total_steps


class BranchesOnStep(jema.IDecayFunction):
    def __call__(self, decay, step, total_steps):
        return decay if step > 10 else 0.0


class ReturnsAVector(jema.IDecayFunction):
    def __call__(self, decay, step, total_steps):
        return jnp.full(3, decay)


@pytest.fixture
def register():
    added = []

    def add(name, cls):
        jema.EMA_DECAY_FUNCTIONS[name] = cls
        added.append(name)

    yield add
    for name in added:
        del jema.EMA_DECAY_FUNCTIONS[name]


@pytest.mark.parametrize("cls", [NumpyLinear, BranchesOnStep])
def test_untraceable_custom_schedule_names_the_decay_type_and_jax_numpy(register, cls):
    register("custom", cls)
    with pytest.raises(TypeError, match=r"decay_type='custom' cannot be traced by JAX.*jax\.numpy"):
        jema.ema_transform(0.9, "custom", total_steps=10)


def test_custom_schedule_that_needs_total_steps(register):
    register("progress", Progress)
    with pytest.raises(
        ValueError, match=r"decay_type='progress' uses total_steps, but total_steps is None"
    ):
        jema.ema_transform(0.9, "progress")


def test_custom_schedule_must_return_a_scalar(register):
    register("vector", ReturnsAVector)
    with pytest.raises(
        TypeError, match=r"decay_type='vector' must return a float scalar.*shape \(3,\)"
    ):
        jema.ema_transform(0.9, "vector")


def test_params_none_in_init_and_update():
    tx = jema.ema_transform()
    with pytest.raises(ValueError, match="requires the current value of parameters"):
        tx.init(None)
    with pytest.raises(ValueError, match="requires the current value of parameters"):
        tx.update(jnp.zeros(2), tx.init(jnp.zeros(2)), None)


def test_batch_stats_without_attaching_first():
    tx = jema.ema_transform()
    with pytest.raises(ValueError, match=r"EMA holds no batch_stats: call jema.attach_batch_stats"):
        tx.update(
            jnp.zeros(2), tx.init(jnp.zeros(2)), jnp.zeros(2), batch_stats={"mean": jnp.zeros(2)}
        )


def test_batch_stats_with_a_different_structure():
    tx = jema.ema_transform()
    state = jema.attach_batch_stats(tx.init(jnp.zeros(2)), {"bn": {"mean": jnp.zeros(2)}})
    with pytest.raises(
        ValueError,
        match=r"different structure.*missing \[\"\['bn'\]\['mean'\]\"\], "
        r"unexpected \[\"\['bn'\]\['var'\]\"\]",
    ):
        tx.update(jnp.zeros(2), state, jnp.zeros(2), batch_stats={"bn": {"var": jnp.zeros(2)}})


def test_attach_rejects_none():
    state = jema.ema_transform().init(jnp.zeros(2))
    with pytest.raises(ValueError, match="batch_stats is None"):
        jema.attach_batch_stats(state, None)


def test_readers_without_an_ema_state():
    state = optax.adam(1e-3).init(jnp.zeros(2))
    for read in (jema.ema_params, jema.ema_batch_stats, jema.ema_count):
        with pytest.raises(
            ValueError, match=r"no EMA state in this optimizer state \(a tuple\).*jema.with_ema"
        ):
            read(state)
    with pytest.raises(ValueError, match="no EMA state"):
        jema.attach_batch_stats(state, {"mean": jnp.zeros(2)})


def test_readers_with_two_ema_states():
    tx = optax.chain(jema.ema_transform(), jema.ema_transform())
    with pytest.raises(
        ValueError, match=r"2 EMA states in this optimizer state, at \['\[0\]', '\[1\]'\]"
    ):
        jema.ema_params(tx.init(jnp.zeros(2)))


def test_batch_stats_or_params_of_another_shape_are_refused_not_broadcast():
    tx = jema.ema_transform()
    state = jema.attach_batch_stats(tx.init({"w": jnp.zeros(1)}), {"m": jnp.zeros(1)})
    with pytest.raises(
        ValueError,
        match=r"batch_stats .* differ in shape .*\"\['m'\]: EMA \(1,\), given \(2, 3\)\"",
    ):
        tx.update(
            {"w": jnp.zeros(1)}, state, {"w": jnp.zeros(1)}, batch_stats={"m": jnp.ones((2, 3))}
        )
    with pytest.raises(
        ValueError, match=r"params .* differ in shape .*\"\['w'\]: EMA \(1,\), given \(3,\)\""
    ):
        tx.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})


class NanAtStep5(jema.IDecayFunction):
    def __call__(self, decay, step, total_steps):
        return jnp.where(step == 5, jnp.nan, decay)


class Overshoots(jema.IDecayFunction):
    """``2 * decay`` from step 1000 on: above 1 for any decay over 0.5."""

    def __call__(self, decay, step, total_steps):
        return jnp.where(step >= 1000, 2 * decay, decay)


@pytest.mark.parametrize(
    ("cls", "total_steps", "message"),
    [
        (NanAtStep5, None, r"gives d = nan \(1 - d = nan\) at step 5"),
        (
            Overshoots,
            None,
            r"gives d = 1\.79.* at step \d{4}; d must be a finite number in \[0, 1\]",
        ),
        (Overshoots, 5000, r"at every step from 1 to total_steps \(5000\)"),
    ],
)
def test_a_schedule_that_would_poison_the_ema_is_refused_when_built(
    register, cls, total_steps, message
):
    register("bad", cls)
    with pytest.raises(ValueError, match=rf"decay_type='bad' .*{message}"):
        jema.ema_transform(0.9, "bad", total_steps=total_steps)


def test_a_schedule_is_probed_only_up_to_total_steps(register):
    register("bad", Overshoots)
    jema.ema_transform(0.9, "bad", total_steps=999)


@pytest.mark.parametrize("name", ["every_k_steps", "total_steps"])
def test_counts_past_the_int32_step_counter_are_refused_when_built(name):
    with pytest.raises(ValueError, match=rf"{name} must be .*at most 2147483647.*got 2147483648"):
        jema.ema_transform(0.9, "exp", **{"total_steps": 10, name: 2**31})


def test_a_transform_built_inside_a_jit_still_probes_its_schedule(register):
    register("bad", NanAtStep5)

    @jax.jit
    def build_and_step(w):
        jema.ema_transform(0.9, "threshold").init(w)  # a good one builds under tracing
        with pytest.raises(ValueError, match=r"decay_type='bad' gives d = nan"):
            jema.ema_transform(0.9, "bad")
        return w

    build_and_step(jnp.ones(2))
