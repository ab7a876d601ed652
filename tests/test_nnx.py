"""jema.nnx: BatchStat EMA with nnx.Optimizer, evaluation on the EMA, finalize, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jema
import jema.nnx
from tests.flax_models import NnxNet, batches, nnx_train_step, nnx_training

WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)


def pure(model, which=WEIGHTS):
    return jax.tree.map(lambda x: np.array(x, copy=True), nnx.as_pure(nnx.state(model, which)))


def test_ema_of_params_and_batch_stats_matches_numpy_replay():
    model, optimizer = nnx_training(decay=0.8)
    ema = pure(model)
    for x, y in batches(5):
        nnx_train_step(model, optimizer, x, y)
        ema = jax.tree.map(lambda e, w: e * 0.8 + 0.2 * w, ema, pure(model))
    with jema.nnx.ema_weights(optimizer, model):
        swapped = pure(model)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), swapped, ema)
    assert int(jema.ema_count(optimizer.opt_state)) == 5
    assert not np.allclose(pure(model)["bn"]["mean"], ema["bn"]["mean"])


def test_ema_weights_swaps_in_and_restores_also_after_an_exception():
    model, optimizer = nnx_training()
    for x, y in batches(2):
        nnx_train_step(model, optimizer, x, y)
    raw = pure(model)
    x = batches(1, seed=2)[0][0]
    model.eval()
    seen = {}
    with (
        pytest.raises(RuntimeError, match="validation failed"),
        jema.nnx.ema_weights(optimizer, model) as swapped,
    ):
        seen["model"], seen["out"] = swapped, model(x)
        seen["kernel"] = pure(model, nnx.Param)["dense2"]["kernel"]
        raise RuntimeError("validation failed")
    assert seen["model"] is model
    ema_out = seen["out"]
    np.testing.assert_array_equal(
        seen["kernel"], jema.ema_params(optimizer.opt_state)["dense2"]["kernel"]
    )
    jax.tree.map(np.testing.assert_array_equal, pure(model), raw)
    assert not np.allclose(model(x), ema_out)
    jema.nnx.finalize(optimizer, model)
    np.testing.assert_array_equal(model(x), ema_out)
    np.testing.assert_array_equal(
        pure(model, nnx.BatchStat)["bn"]["var"],
        jema.ema_batch_stats(optimizer.opt_state)["bn"]["var"],
    )


def test_model_without_batch_stats_and_bfloat16_params():
    model = nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    tx = jema.with_ema(optax.sgd(1.0), decay=0.5, decay_type="constant", ema_dtype=jnp.float32)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    start = pure(model)
    grads = nnx.grad(lambda m: m(jnp.ones((1, 3))).sum())(model)
    jema.nnx.update(optimizer, model, grads)
    jema.nnx.finalize(optimizer, model)
    assert model.kernel[...].dtype == jnp.bfloat16
    expected = (start["kernel"].astype(np.float32) - 1.0) * 0.5 + start["kernel"].astype(
        np.float32
    ) * 0.5
    np.testing.assert_array_equal(model.kernel[...], expected.astype(jnp.bfloat16))


def test_errors_teach_the_fix():
    model = NnxNet(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, jema.with_ema(optax.sgd(0.1)), wrt=nnx.Param)
    grads = nnx.grad(lambda m: m(jnp.ones((2, 4))).sum())(model)
    for call in (
        lambda: jema.nnx.update(optimizer, model, grads),
        lambda: jema.nnx.finalize(optimizer, model),
        lambda: jema.nnx.ema_weights(optimizer, model).__enter__(),
    ):
        with pytest.raises(ValueError, match=r"jema.nnx.attach_batch_stats\(optimizer, model\)"):
            call()
    linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no nnx.BatchStat"):
        jema.nnx.attach_batch_stats(
            nnx.Optimizer(linear, jema.with_ema(optax.sgd(0.1)), wrt=nnx.Param), linear
        )
    with pytest.raises(ValueError, match="jema.with_ema"):
        jema.nnx.attach_batch_stats(nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), model)


def test_the_four_functions_take_optimizer_then_model_and_the_old_order_warns():
    model, optimizer = nnx_training(decay=0.5)
    for x, y in batches(2):
        nnx_train_step(model, optimizer, x, y)
    raw = pure(model)
    with jema.nnx.ema_weights(optimizer, model):
        new_order = pure(model)
    with (
        pytest.warns(
            DeprecationWarning, match=r"ema_weights\(model, optimizer\) is deprecated"
        ) as w,
        jema.nnx.ema_weights(model, optimizer),
    ):
        old_order = pure(model)
    assert w[0].filename == __file__  # the warning points at the caller's line
    jax.tree.map(np.testing.assert_array_equal, old_order, new_order)
    jax.tree.map(np.testing.assert_array_equal, pure(model), raw)
    with pytest.warns(DeprecationWarning, match=r"finalize\(model, optimizer\) is deprecated") as w:
        jema.nnx.finalize(model, optimizer)
    assert w[0].filename == __file__
    jax.tree.map(np.testing.assert_array_equal, pure(model), new_order)
    for call in (jema.nnx.finalize, lambda *a: jema.nnx.ema_weights(*a).__enter__()):
        for args in ((model, model), (optimizer, optimizer)):
            with pytest.raises(
                TypeError, match=r"takes \(optimizer, model\): an nnx.Optimizer, then"
            ):
                call(*args)
