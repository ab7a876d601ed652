"""ema_transform: SG's numbers against numpy replays, dtypes, and optax/flax wrappers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jema
from tests.sg_reference import sg_constant, sg_ema_replay, sg_exp, sg_threshold

SCHEDULES = {
    "constant": lambda decay, total: functools.partial(sg_constant, decay),
    "threshold": lambda decay, total: functools.partial(sg_threshold, decay),
    "exp": lambda decay, total: lambda step: sg_exp(decay, step, total),
}


def run_ema(tx, trajectory, initial):
    """Feed ``tx`` the weights after each step (updates = 0), jitted, as a trainer would."""
    state = tx.init(initial)
    update = jax.jit(tx.update)
    for weights in trajectory:
        _, state = update(jax.tree.map(jnp.zeros_like, weights), state, weights)
    return state


@pytest.mark.parametrize("decay_type", sorted(SCHEDULES))
@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_matches_sg_replay_on_random_trajectory(decay_type, decay):
    rng = np.random.default_rng(0)
    total = 40
    initial = rng.normal(size=(5, 7)).astype(np.float32)
    trajectory = list(
        initial + np.cumsum(rng.normal(size=(total, 5, 7)), axis=0).astype(np.float32)
    )
    tx = jema.ema_transform(decay, decay_type, total_steps=total)
    state = run_ema(tx, [{"w": jnp.asarray(w)} for w in trajectory], {"w": jnp.asarray(initial)})
    expected = sg_ema_replay(initial, trajectory, SCHEDULES[decay_type](decay, total))
    np.testing.assert_allclose(jema.ema_params(state)["w"], expected, rtol=1e-6, atol=5e-7)
    assert int(jema.ema_count(state)) == total


def test_first_threshold_update_uses_two_elevenths():
    tx = jema.ema_transform(0.9999, "threshold")
    p0, p1 = jnp.full(4, 3.0), jnp.full(4, 14.0)
    _, state = tx.update(jnp.zeros(4), tx.init(p0), p1)
    np.testing.assert_allclose(jema.ema_params(state), 3.0 * 2 / 11 + 14.0 * 9 / 11, rtol=1e-6)


def test_averages_the_post_step_weights_as_last_in_a_chain():
    tx = jema.with_ema(optax.sgd(0.5), decay=0.75, decay_type="constant")
    params = {"w": jnp.array([1.0, 2.0])}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.array([1.0, -1.0])}, state, params)
    np.testing.assert_array_equal(updates["w"], [-0.5, 0.5])
    new = optax.apply_updates(params, updates)["w"]
    np.testing.assert_allclose(jema.ema_params(state)["w"], 0.75 * params["w"] + 0.25 * new)


def test_matches_supergradients_model_ema_on_a_torch_model():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 2),
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sg_ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    floats = [k for k, v in sg_ema.items() if v.dtype.is_floating_point]
    # a fresh numpy copy: JAX may read a host buffer after dispatch, when torch has moved on
    as_tree = lambda: {k: jnp.asarray(model.state_dict()[k].numpy().copy()) for k in floats}  # noqa: E731
    tx = jema.ema_transform(0.99, "threshold")
    state = tx.init(as_tree())
    update = jax.jit(tx.update)
    for step in range(1, 16):
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        sgd.step()
        d = min(0.99, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_v, model_v in zip(sg_ema.values(), model.state_dict().values(), strict=True):
                if ema_v.dtype.is_floating_point:
                    ema_v.copy_(ema_v * d + (1.0 - d) * model_v.detach())
        weights = as_tree()
        _, state = update(jax.tree.map(jnp.zeros_like, weights), state, weights)
    for k in floats:
        np.testing.assert_allclose(
            jema.ema_params(state)[k], sg_ema[k].numpy(), rtol=2e-6, atol=2e-7
        )


finite = st.floats(-1e3, 1e3, width=32)
arrays = hnp.arrays(np.float32, st.integers(1, 6), elements=finite)


@given(
    p=arrays,
    decay=st.floats(0.01, 0.99),
    n=st.integers(1, 8),
    kind=st.sampled_from(sorted(SCHEDULES)),
)
def test_constant_params_keep_the_ema_constant(p, decay, n, kind):
    state = run_ema(jema.ema_transform(decay, kind, total_steps=8), [p] * n, p)
    np.testing.assert_allclose(jema.ema_params(state), p, rtol=1e-6, atol=1e-6)


@given(history=hnp.arrays(np.float32, (6, 3), elements=finite), decay=st.floats(0.01, 0.99))
def test_ema_stays_within_the_elementwise_range_of_its_history(history, decay):
    state = run_ema(jema.ema_transform(decay, "threshold"), list(history[1:]), history[0])
    ema = np.asarray(jema.ema_params(state))
    slack = 1e-5 * (1 + np.abs(history).max(axis=0))
    assert np.all(ema >= history.min(axis=0) - slack)
    assert np.all(ema <= history.max(axis=0) + slack)


@given(history=hnp.arrays(np.float32, (4, 3), elements=finite))
def test_a_decay_near_zero_tracks_the_params(history):
    state = run_ema(jema.ema_transform(1e-7, "constant"), list(history[1:]), history[0])
    np.testing.assert_allclose(jema.ema_params(state), history[-1], rtol=1e-5, atol=1e-3)


def test_float32_ema_of_bfloat16_params_moves_below_bf16_resolution():
    p0 = jnp.ones(3, jnp.bfloat16)
    p1 = jnp.full(3, 1.0078125, jnp.bfloat16)  # the next bfloat16 after 1.0
    state = run_ema(jema.ema_transform(0.999, "constant", ema_dtype=jnp.float32), [p1], p0)
    ema = jema.ema_params(state)
    assert ema.dtype == jnp.float32
    np.testing.assert_allclose(ema, 0.999 + 0.001 * 1.0078125, rtol=1e-7)
    assert np.all(np.asarray(ema.astype(jnp.bfloat16), np.float32) == 1.0)


def test_bfloat16_ema_does_not_round_the_decay_to_bfloat16():
    p0, p1 = jnp.full(2, 3.0, jnp.bfloat16), jnp.full(2, 1000.0, jnp.bfloat16)
    state = run_ema(jema.ema_transform(0.999, "constant"), [p1], p0)
    ema = jema.ema_params(state)
    assert ema.dtype == jnp.bfloat16
    # float32 arithmetic, one rounding to bfloat16 at the end (bf16(0.999) would be 1.0)
    expected = np.float32(3.0) * np.float32(0.999) + np.float32(1.0 - 0.999) * np.float32(1000.0)
    np.testing.assert_array_equal(ema, jnp.full(2, expected, jnp.bfloat16))


def test_one_minus_decay_reaches_a_float32_ema_of_bf16_params_unrounded():
    p0, p1 = jnp.zeros(2, jnp.bfloat16), jnp.full(2, 1000.0, jnp.bfloat16)
    state = run_ema(jema.ema_transform(0.999, "constant", ema_dtype=jnp.float32), [p1], p0)
    # 1 - d formed in float64 as SG does, then float32: 0.001 (not float32's 0.00099998713)
    np.testing.assert_array_equal(
        jema.ema_params(state), np.float32(1.0 - 0.999) * np.float32(1000.0)
    )


def test_non_floating_leaves_keep_their_initial_value_and_none_passes():
    params = {"w": jnp.ones(2), "count": jnp.array([7], jnp.int32), "gone": None}
    new = {"w": jnp.full(2, 3.0), "count": jnp.array([9], jnp.int32), "gone": None}
    tx = jema.ema_transform(0.5, "constant")
    _, state = tx.update(
        jax.tree.map(
            lambda x: None if x is None else jnp.zeros_like(x), new, is_leaf=lambda x: x is None
        ),
        tx.init(params),
        new,
    )
    ema = jema.ema_params(state)
    assert ema["gone"] is None and int(ema["count"][0]) == 7
    np.testing.assert_allclose(ema["w"], 2.0)


def test_init_copies_the_params_so_the_state_can_be_donated():
    params = {"w": jnp.arange(4.0)}
    tx = jema.ema_transform(0.9, "constant")
    state = tx.init(params)
    assert (
        jema.ema_params(state)["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()
    )
    step = jax.jit(
        lambda s, p: tx.update(jax.tree.map(jnp.zeros_like, p), s, p)[1], donate_argnums=0
    )
    new_state = step(state, params)
    assert jema.ema_params(state)["w"].is_deleted()
    np.testing.assert_array_equal(params["w"], np.arange(4.0))
    np.testing.assert_allclose(jema.ema_params(new_state)["w"], np.arange(4.0))


def test_donated_train_step_reuses_every_buffer():
    tx = jema.with_ema(optax.adam(1e-2), decay=0.9)
    params = {"a": jnp.ones((8, 8)), "b": jnp.zeros(8)}
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, state):
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = train_step.lower(params, state).compile()
    assert "donated buffers were not usable" not in str(compiled.as_text())
    new_params, new_state = train_step(params, state)
    assert all(x.is_deleted() for x in jax.tree.leaves((params, state)))
    assert int(jema.ema_count(new_state)) == 1
    np.testing.assert_allclose(
        jema.ema_params(new_state)["a"], new_params["a"] * (1 - 2 / 11) + 2 / 11, rtol=1e-6
    )


def test_multisteps_advances_only_on_real_optimizer_steps():
    k = 3
    tx = optax.MultiSteps(jema.with_ema(optax.sgd(0.1), decay=0.6, decay_type="constant"), k)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    trajectory = []
    for i in range(2 * k):
        updates, state = update({"w": jnp.full(2, float(i))}, state, params)
        params = optax.apply_updates(params, updates)
        if (i + 1) % k == 0:
            trajectory.append(np.asarray(params["w"]))
        assert int(jema.ema_count(state)) == (i + 1) // k
    expected = sg_ema_replay(np.zeros(2, np.float32), trajectory, lambda s: 0.6)
    np.testing.assert_allclose(jema.ema_params(state)["w"], expected, rtol=1e-6)
    assert not np.allclose(expected, 0)


def test_masked_leaves_are_left_out_of_the_ema():
    mask = {"w": True, "frozen": False}
    tx = optax.chain(optax.sgd(1.0), optax.masked(jema.ema_transform(0.5, "constant"), mask))
    params = {"w": jnp.zeros(2), "frozen": jnp.zeros(2)}
    _, state = jax.jit(tx.update)(
        {"w": -jnp.ones(2), "frozen": -jnp.ones(2)}, tx.init(params), params
    )
    ema = jema.ema_params(state)
    assert isinstance(ema["frozen"], optax.MaskedNode)
    np.testing.assert_allclose(ema["w"], 0.5)


def test_inject_hyperparams_makes_the_decay_a_runtime_value():
    tx = optax.inject_hyperparams(jema.ema_transform)(decay=0.5, decay_type="constant")
    params = jnp.zeros(2)
    state = tx.init(params)
    state.hyperparams["decay"] = jnp.asarray(0.25)
    _, state = jax.jit(tx.update)(jnp.zeros(2), state, jnp.ones(2))
    np.testing.assert_allclose(jema.ema_params(state), 0.75)


def test_inject_hyperparams_forwards_schedule_options():
    tx = optax.inject_hyperparams(jema.ema_transform, static_args="total_steps")(
        decay=0.9, decay_type="exp", total_steps=10, beta=2.0
    )
    _, state = jax.jit(tx.update)(jnp.zeros(2), tx.init(jnp.zeros(2)), jnp.ones(2))
    np.testing.assert_allclose(jema.ema_params(state), 1 - sg_exp(0.9, 1, 10, 2.0), rtol=1e-6)


def test_apply_if_finite_keeps_the_ema_on_a_nan_step():
    tx = optax.apply_if_finite(jema.with_ema(optax.sgd(1.0), decay=0.5, decay_type="constant"), 3)
    params = jnp.zeros(2)
    state = tx.init(params)
    _, state = tx.update(jnp.array([jnp.nan, 1.0]), state, params)
    assert int(jema.ema_count(state)) == 0
    np.testing.assert_array_equal(jema.ema_params(state), [0.0, 0.0])
    _, state = tx.update(-jnp.ones(2), state, params)
    np.testing.assert_allclose(jema.ema_params(state), 0.5)


def test_nnx_optimizer_forwards_params_and_batch_stats():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = jema.with_ema(optax.sgd(0.1), decay=0.8, decay_type="constant")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    initial = np.asarray(model.kernel[...])
    x = jnp.ones((4, 3))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)

    trajectory = []
    for _ in range(3):
        step(model, optimizer)
        trajectory.append(np.asarray(model.kernel[...]))
    expected = sg_ema_replay(initial, trajectory, lambda s: 0.8)
    np.testing.assert_allclose(jema.ema_params(optimizer.opt_state)["kernel"], expected, rtol=1e-6)
    assert int(jema.ema_count(optimizer.opt_state)) == 3


def test_flax_train_state_carries_the_ema():
    params = {"w": jnp.ones(3)}
    state = train_state.TrainState.create(
        apply_fn=None,
        params=params,
        tx=jema.with_ema(optax.sgd(1.0), decay=0.5, decay_type="constant"),
    )
    state = jax.jit(lambda s: s.apply_gradients(grads={"w": jnp.ones(3)}))(state)
    np.testing.assert_allclose(jema.ema_params(state.opt_state)["w"], 0.5)


def test_batch_stats_start_at_attachment_and_average_with_the_same_decay():
    tx = jema.with_ema(optax.sgd(0.1), decay=0.9999, decay_type="threshold")
    params, stats0 = {"w": jnp.ones(2)}, {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
    state = jema.attach_batch_stats(tx.init(params), stats0)
    stats1 = {"bn": {"mean": jnp.full(3, 11.0), "var": jnp.full(3, 2.0)}}
    _, state = jax.jit(tx.update)({"w": jnp.zeros(2)}, state, params, batch_stats=stats1)
    stats = jema.ema_batch_stats(state)["bn"]
    np.testing.assert_allclose(stats["mean"], 9.0, rtol=1e-6)
    np.testing.assert_allclose(stats["var"], 2 / 11 + 2 * 9 / 11, rtol=1e-6)


def test_inject_hyperparams_with_bfloat16_params_names_the_fix():
    params = jnp.ones(2, jnp.bfloat16)
    injected = optax.inject_hyperparams(jema.ema_transform)
    with pytest.raises(
        ValueError, match=r"got Array\(1, dtype=bfloat16\).*hyperparam_dtype=jnp.float32"
    ):
        injected(decay=0.999, decay_type="constant").init(params)
    with pytest.raises(ValueError, match="pass static_args='ema_dtype'"):
        injected(decay=0.5, ema_dtype=jnp.float32).init(jnp.ones(2))
    tx = optax.inject_hyperparams(
        jema.ema_transform, static_args="ema_dtype", hyperparam_dtype=jnp.float32
    )(decay=0.999, decay_type="constant", ema_dtype=jnp.float32)
    _, state = jax.jit(tx.update)(jnp.zeros(2, jnp.bfloat16), tx.init(params), params * 2)
    np.testing.assert_allclose(jema.ema_params(state), 0.999 + 0.001 * 2, rtol=1e-6)


def test_attached_statistics_follow_a_float32_ema_of_bfloat16_params():
    tx = jema.ema_transform(0.999, "constant", ema_dtype=jnp.float32)
    params = jnp.ones(2, jnp.bfloat16)
    state = jema.attach_batch_stats(tx.init(params), {"mean": jnp.ones(2, jnp.bfloat16)})
    stats1 = {"mean": jnp.full(2, 1.0078125, jnp.bfloat16)}
    _, state = jax.jit(tx.update)(jnp.zeros(2, jnp.bfloat16), state, params, batch_stats=stats1)
    mean = jema.ema_batch_stats(state)["mean"]
    assert mean.dtype == jnp.float32
    np.testing.assert_allclose(mean, 0.999 + 0.001 * 1.0078125, rtol=1e-7)
