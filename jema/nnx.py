"""The EMA with ``nnx.Optimizer``: BatchStat averaging, evaluation on the EMA, the final swap.

Build the optimizer as usual, ``nnx.Optimizer(model, jema.with_ema(tx), wrt=nnx.Param)``,
call :func:`attach_batch_stats` once when the model has ``nnx.BatchStat`` variables, and
step with :func:`update` so the EMA averages the statistics with the weights.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx

from jema import _state
from jema._trees import cast_like


def attach_batch_stats(optimizer: nnx.Optimizer, model: nnx.Module) -> None:
    """Give the optimizer's EMA a copy of the model's ``nnx.BatchStat`` values, in place.

    Args:
      optimizer: an ``nnx.Optimizer`` built with :func:`jema.with_ema`.
      model: the module it optimizes.

    Raises:
      ValueError: the model has no ``nnx.BatchStat`` variables, or the optimizer holds
        no EMA or several.

    Example:
      >>> import optax, jema
      >>> from flax import nnx
      >>> model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, jema.with_ema(optax.sgd(0.1)), wrt=nnx.Param)
      >>> attach_batch_stats(optimizer, model)
      >>> jema.ema_batch_stats(optimizer.opt_state)["mean"].tolist()
      [0.0, 0.0, 0.0]
    """
    stats = _batch_stats(model)
    if not jax.tree.leaves(stats):
        raise ValueError(
            f"{type(model).__name__} has no nnx.BatchStat variables; there is nothing to attach."
        )
    attached = _state.attach_batch_stats(optimizer.opt_state, stats)
    optimizer.opt_state = nnx.data(
        jax.tree.map(
            lambda x: x if isinstance(x, nnx.Variable) else nnx.OptArray(x),
            attached,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )


def update(optimizer: nnx.Optimizer, model: nnx.Module, grads: Any, **kwargs: Any) -> Any:
    """``optimizer.update(model, grads)``, giving the EMA the model's new BatchStat values.

    Args:
      optimizer: an ``nnx.Optimizer`` built with :func:`jema.with_ema`.
      model: the module it optimizes, after the forward pass of this step.
      grads: the gradients from ``nnx.grad``.
      **kwargs: more arguments for ``tx.update``.

    Returns:
      The updates, as ``nnx.Optimizer.update`` returns them.

    Raises:
      ValueError: the model has BatchStat variables but the EMA holds none (call
        :func:`attach_batch_stats` first), or the optimizer holds no EMA or several.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, jema.with_ema(optax.sgd(0.1)), wrt=nnx.Param)
      >>> grads = nnx.grad(lambda m: m(jnp.ones((1, 2))).sum())(model)
      >>> _ = update(optimizer, model, grads)
      >>> int(jema.ema_count(optimizer.opt_state))
      1
    """
    if _has_batch_stats(optimizer, model):
        kwargs["batch_stats"] = _batch_stats(model)
    return optimizer.update(model, grads, **kwargs)


@contextlib.contextmanager
def ema_weights(
    optimizer: nnx.Optimizer, model: nnx.Module, sigma_rel: float | None = None
) -> Iterator[nnx.Module]:
    """Evaluate on the EMA: swap its weights (and statistics) into ``model``, then restore.

    The raw values come back when the block ends, also when it raises. The arguments come in
    flax's order, ``optimizer.update(model, grads)``'s: ``(model, optimizer)`` given
    positionally, the order of jema 0.x, still works this release, with a ``DeprecationWarning``.

    Args:
      optimizer: an ``nnx.Optimizer`` built with :func:`jema.with_ema`.
      model: the module the optimizer trains.
      sigma_rel: for a :func:`jema.power_ema`, the tracked width; None when it tracks one.

    Yields:
      ``model``, holding the EMA's values (cast to the variables' dtypes).

    Raises:
      ValueError: as :func:`finalize`.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, jema.with_ema(optax.sgd(0.1)), wrt=nnx.Param)
      >>> with ema_weights(optimizer, model):
      ...     predictions = model(jnp.ones((1, 2)))
    """
    optimizer, model = _in_order(optimizer, model, "ema_weights", stacklevel=4)
    raw = nnx.as_pure(nnx.state(model, _filter(optimizer, model)))
    _swap_in(optimizer, model, sigma_rel)
    try:
        yield model
    finally:
        nnx.update(model, raw)


def finalize(optimizer: nnx.Optimizer, model: nnx.Module, sigma_rel: float | None = None) -> None:
    """SuperGradients' end-of-training swap, in place: the model takes the EMA's values.

    ``(model, optimizer)`` given positionally, the order of jema 0.x, still works this release,
    with a ``DeprecationWarning``.

    Args:
      optimizer: an ``nnx.Optimizer`` built with :func:`jema.with_ema`.
      model: the module the optimizer trains.
      sigma_rel: for a :func:`jema.power_ema`, the tracked width; None when it tracks one.

    Raises:
      ValueError: the model has BatchStat variables but the EMA holds none, or the
        optimizer holds no EMA or several.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, jema.with_ema(optax.sgd(0.1)), wrt=nnx.Param)
      >>> finalize(optimizer, model)
    """
    _swap_in(*_in_order(optimizer, model, "finalize"), sigma_rel)


def _swap_in(optimizer: nnx.Optimizer, model: nnx.Module, sigma_rel: float | None) -> None:
    raw_params = nnx.as_pure(nnx.state(model, optimizer.wrt))
    nnx.update(model, cast_like(raw_params, _state.ema_params(optimizer.opt_state, sigma_rel)))
    if _has_batch_stats(optimizer, model):
        stats = _state.ema_batch_stats(optimizer.opt_state, sigma_rel)
        nnx.update(model, cast_like(nnx.as_pure(_batch_stats(model)), stats))


def _in_order(
    first: Any, second: Any, name: str, stacklevel: int = 3
) -> tuple[nnx.Optimizer, nnx.Module]:
    """``(optimizer, model)``, from either order: jema 0.x took ``(model, optimizer)``."""
    if isinstance(second, nnx.Optimizer) and not isinstance(first, nnx.Optimizer):
        warnings.warn(
            f"jema.nnx.{name}(model, optimizer) is deprecated: pass (optimizer, model), the order "
            "of flax's optimizer.update(model, grads) and of jema.nnx.update; the old order "
            "goes in the next release.",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return second, first
    if not isinstance(first, nnx.Optimizer) or not isinstance(second, nnx.Module):
        raise TypeError(
            f"jema.nnx.{name} takes (optimizer, model): an nnx.Optimizer, then the nnx.Module it "
            "trains; got "
            f"({type(first).__name__}, {type(second).__name__})"
        )
    return first, second


def _has_batch_stats(optimizer: nnx.Optimizer, model: nnx.Module) -> bool:
    if not jax.tree.leaves(_batch_stats(model)):
        return False
    _state.check_attached(
        _state.find_ema_state(optimizer.opt_state).batch_stats,
        f"{type(model).__name__} has nnx.BatchStat variables",
        "call jema.nnx.attach_batch_stats(optimizer, model) once after building the optimizer",
    )
    return True


def _filter(optimizer: nnx.Optimizer, model: nnx.Module) -> Any:
    return (
        nnx.Any(optimizer.wrt, nnx.BatchStat)
        if _has_batch_stats(optimizer, model)
        else optimizer.wrt
    )


def _batch_stats(model: nnx.Module) -> nnx.State:
    return nnx.state(model, nnx.BatchStat)
