"""Tiny linen and nnx classifiers (Dense, BatchNorm, Dense) and data for the training tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jema
import jema.nnx
from jema.train_state import TrainState

IN, HIDDEN, CLASSES = 4, 8, 3


class LinenNet(nn.Module):
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        x = nn.Dense(self.hidden)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dense(CLASSES)(nn.relu(x))


class NnxNet(nnx.Module):
    def __init__(self, hidden: int = HIDDEN, *, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(IN, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, momentum=0.8, rngs=rngs)
        self.dense2 = nnx.Linear(hidden, CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense2(nnx.relu(self.bn(self.dense1(x))))


def batches(n: int, seed: int = 0, size: int = 6) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(seed)
    return [
        (
            jnp.asarray(rng.normal(size=(size, IN)), jnp.float32),
            jnp.asarray(rng.integers(0, CLASSES, size=size), jnp.int32),
        )
        for _ in range(n)
    ]


def linen_state(seed: int = 0, hidden: int = HIDDEN, **ema_kwargs) -> TrainState:
    model = LinenNet(hidden)
    variables = jax.jit(model.init, static_argnames="train")(
        jax.random.key(seed), jnp.zeros((1, IN)), train=False
    )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=jema.with_ema(optax.sgd(0.3, momentum=0.9), **ema_kwargs),
    )


@jax.jit
def linen_train_step(state: TrainState, x: jax.Array, y: jax.Array) -> TrainState:
    def loss(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updated = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updated

    grads, updated = jax.grad(loss, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=updated["batch_stats"])


def nnx_training(seed: int = 0, decay: float = 0.8) -> tuple[NnxNet, nnx.Optimizer]:
    model = NnxNet(rngs=nnx.Rngs(seed))
    tx = jema.with_ema(optax.sgd(0.2, momentum=0.9), decay=decay, decay_type="constant")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    jema.nnx.attach_batch_stats(optimizer, model)
    return model, optimizer


@nnx.jit
def nnx_train_step(model: NnxNet, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> None:
    def loss(model: NnxNet) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    jema.nnx.update(optimizer, model, nnx.grad(loss)(model))
