"""jema TrainState: EMA of params and batch_stats through apply_gradients, eval, finalize."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

import jema
from jema.train_state import TrainState, finalize
from tests.flax_models import LinenNet, batches, linen_state, linen_train_step
from tests.sg_reference import sg_threshold


def numpy_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def replay(initial, trajectory, decay_at):
    """SG's EMA over a trajectory of variable trees, in numpy float32 with a float64 decay."""
    ema = numpy_tree(initial)
    for step, weights in enumerate(trajectory, start=1):
        d = decay_at(step)
        ema = jax.tree.map(lambda e, w, d=d: e * d + (1.0 - d) * w, ema, numpy_tree(weights))
    return ema


def assert_trees_close(actual, expected, **tol):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, **tol), actual, expected)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def variables(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


def test_create_copies_params_and_batch_stats_into_the_ema():
    state = linen_state()
    assert int(jema.ema_count(state.opt_state)) == 0
    assert_trees_equal(state.ema_variables(), variables(state))


@pytest.mark.parametrize(
    ("decay_type", "decay_at"),
    [("constant", lambda step: 0.8), ("threshold", lambda step: sg_threshold(0.95, step))],
)
def test_ema_of_params_and_batch_stats_matches_numpy_replay(decay_type, decay_at):
    state = linen_state(decay=0.8 if decay_type == "constant" else 0.95, decay_type=decay_type)
    initial, trajectory = variables(state), []
    for x, y in batches(6):
        state = linen_train_step(state, x, y)
        trajectory.append(variables(state))
    assert int(jema.ema_count(state.opt_state)) == 6
    assert int(state.step) == 6
    expected = replay(initial, trajectory, decay_at)
    assert_trees_close(state.ema_variables(), expected, rtol=1e-5, atol=1e-6)
    # the raw stats moved away from the EMA's, so both are really tracked
    assert not np.allclose(
        state.batch_stats["BatchNorm_0"]["mean"], expected["batch_stats"]["BatchNorm_0"]["mean"]
    )


def test_apply_gradients_without_batch_stats_leaves_the_statistics_alone():
    state = linen_state(decay=0.5, decay_type="constant")
    grads = jax.tree.map(jnp.ones_like, state.params)
    new = state.apply_gradients(grads=grads)
    assert_trees_equal(new.batch_stats, state.batch_stats)
    assert_trees_equal(jema.ema_batch_stats(new.opt_state), state.batch_stats)
    np.testing.assert_allclose(
        jema.ema_params(new.opt_state)["Dense_1"]["bias"],
        0.5 * state.params["Dense_1"]["bias"] + 0.5 * new.params["Dense_1"]["bias"],
        rtol=1e-6,
    )


def test_eval_on_ema_variables_differs_from_raw_and_equals_a_model_with_the_ema():
    state = linen_state(decay=0.9, decay_type="constant")
    for x, y in batches(3):
        state = linen_train_step(state, x, y)
    x = batches(1, seed=1)[0][0]
    ema_out = state.apply_fn(state.ema_variables(), x, train=False)
    raw_out = state.apply_fn(variables(state), x, train=False)
    assert not np.allclose(ema_out, raw_out)
    final = finalize(state)
    np.testing.assert_array_equal(final.apply_fn(variables(final), x, train=False), ema_out)


def test_finalize_swaps_in_the_ema_and_keeps_dtypes_and_optimizer_state():
    model = LinenNet()
    v = model.init(jax.random.key(0), jnp.zeros((1, 4)), train=False)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), v["params"])
    tx = jema.with_ema(optax.sgd(0.1), decay=0.5, decay_type="constant", ema_dtype=jnp.float32)
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=tx, batch_stats=v["batch_stats"]
    )
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
    final = finalize(state)
    ema = state.ema_variables()
    assert jax.tree.map(lambda p: p.dtype, final.params) == jax.tree.map(lambda p: p.dtype, params)
    assert_trees_equal(final.params, jax.tree.map(lambda e: e.astype(jnp.bfloat16), ema["params"]))
    assert_trees_equal(final.batch_stats, ema["batch_stats"])
    assert final.opt_state is state.opt_state
    assert int(final.step) == 1


def test_model_without_batch_stats_has_only_params():
    tx = jema.with_ema(optax.sgd(1.0), decay=0.75, decay_type="constant")
    state = TrainState.create(apply_fn=None, params={"w": jnp.array([4.0])}, tx=tx)
    state = state.apply_gradients(grads={"w": jnp.array([4.0])})
    ema = state.ema_variables()
    assert list(ema) == ["params"]
    assert ema["params"]["w"].tolist() == [3.0]
    assert finalize(state).params["w"].tolist() == [3.0]
    assert finalize(state).batch_stats is None


def test_errors_teach_the_fix():
    with pytest.raises(ValueError, match="jema.with_ema"):
        TrainState.create(apply_fn=None, params={"w": jnp.ones(1)}, tx=optax.sgd(0.1))
    no_stats = TrainState.create(
        apply_fn=None, params={"w": jnp.ones(1)}, tx=jema.with_ema(optax.sgd(0.1))
    )
    with pytest.raises(ValueError, match=r"TrainState.create\(\.\.\., batch_stats="):
        no_stats.replace(batch_stats={"mean": jnp.zeros(1)}).ema_variables()
    with pytest.raises(ValueError, match=r"TrainState.create\(\.\.\., batch_stats=") as error:
        no_stats.apply_gradients(grads={"w": jnp.ones(1)}, batch_stats={"mean": jnp.zeros(1)})
    assert "attach_batch_stats" not in str(error.value)  # the linen user's layer, not optax's
    with pytest.raises(TypeError, match=r"jema.nnx.finalize"):
        finalize({"params": {}})


def test_a_jitted_step_compiles_once():
    tx = jema.with_ema(optax.sgd(0.1), decay=0.9)
    state = jema.TrainState.create(apply_fn=None, params={"w": jnp.ones(3)}, tx=tx)
    step = jax.jit(lambda s: s.apply_gradients(grads={"w": jnp.ones(3)}))
    for _ in range(3):
        state = step(state)
    assert step._cache_size() == 1
    assert int(state.step) == 3


class Fp8Net(nn.Module):
    """flax's fp8 Dense: its scales and amax histories live in OVERWRITE_WITH_GRADIENT."""

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.Dense(6, dot_general_cls=nn.Fp8DirectDotGeneralOp)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2, dot_general_cls=nn.Fp8DirectDotGeneralOp)(nn.relu(x)).sum()


@pytest.mark.parametrize("with_stats", [False, True])
def test_fp8_overwrite_with_gradient_params_step_as_in_flax(with_stats):
    model, x = Fp8Net(), jax.random.normal(jax.random.key(1), (4, 3))
    variables = model.init(jax.random.key(0), x)
    fp8 = {k: variables[k] for k in ("params", OVERWRITE_WITH_GRADIENT)}
    stats = variables["batch_stats"] if with_stats else None
    tx = jema.with_ema(optax.sgd(0.1), decay=0.5, decay_type="constant")
    ours = TrainState.create(apply_fn=model.apply, params=fp8, tx=tx, batch_stats=stats)
    theirs = train_state.TrainState.create(apply_fn=model.apply, params=fp8, tx=tx)
    ema = fp8["params"]
    for _ in range(3):
        running = ours.batch_stats if with_stats else variables["batch_stats"]

        def loss(params, running=running):
            out, new = model.apply({**params, "batch_stats": running}, x, mutable="batch_stats")
            return out, new["batch_stats"]

        grads, new_stats = jax.grad(loss, has_aux=True)(ours.params)
        ours = ours.apply_gradients(grads=grads, batch_stats=new_stats if with_stats else None)
        theirs = theirs.apply_gradients(grads=grads)
        ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, ema, ours.params["params"])
    if with_stats:
        assert_trees_equal(ours.batch_stats, new_stats)
    assert_trees_equal(ours.params, theirs.params)  # flax's OWG rule: grads overwrite them
    assert_trees_equal(ours.params[OVERWRITE_WITH_GRADIENT], grads[OVERWRITE_WITH_GRADIENT])
    assert_trees_equal(jema.ema_params(ours.opt_state), ema)
    averaged = ours.ema_variables()
    assert_trees_equal(averaged["params"]["params"], ema)
    assert_trees_equal(averaged["params"][OVERWRITE_WITH_GRADIENT], grads[OVERWRITE_WITH_GRADIENT])
    final = finalize(ours)
    assert_trees_equal(final.params["params"], ema)
    assert_trees_equal(final.params[OVERWRITE_WITH_GRADIENT], ours.params[OVERWRITE_WITH_GRADIENT])
    assert (averaged.get("batch_stats") is None) == (not with_stats)
