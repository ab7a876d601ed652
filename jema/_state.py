"""The EMA's state, finding it inside any optimizer state, reading it, attaching statistics."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from jema._trees import copy_floating, pure, shared_float_dtype


class WeightEmaState(NamedTuple):
    """State of :func:`jema.ema_transform`.

    Attributes:
      count: optimizer steps so far, counting those ``every_k_steps`` does not average and
        not those ``skip_nonfinite`` skips; the next step uses ``decay_fn(count + 1)``.
      ema: the averaged weights, a tree shaped like the params, in the EMA dtype.
      batch_stats: averaged BatchNorm statistics, or None until
        :func:`jema.attach_batch_stats` gives the EMA its initial ones.
    """

    count: jax.Array  # type: ignore[assignment]  # shape=(), int32; optax's name, hides tuple.count
    ema: optax.Params  # tree of the params' shapes, ema_dtype (default: each param's dtype)
    batch_stats: Any  # None, or a tree of the model's batch statistics' shapes


def find_ema_state(opt_state: Any) -> WeightEmaState:
    """The one :class:`WeightEmaState` inside ``opt_state`` (chains, MultiSteps, wrappers, nnx).

    Args:
      opt_state: an optimizer state, or ``nnx.Optimizer.opt_state``.

    Returns:
      The EMA state, with nnx variables unwrapped to plain arrays.

    Raises:
      ValueError: when there is no EMA state, or more than one.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> tx = jema.with_ema(optax.sgd(0.1))
      >>> int(find_ema_state(tx.init({"w": jnp.ones(2)})).count)
      0
    """
    found = _ema_states_with_paths(opt_state)
    if not found:
        raise ValueError(
            f"no EMA state in this optimizer state (a {type(opt_state).__name__}): build the "
            "optimizer with jema.with_ema(optimizer) or chain jema.ema_transform() last."
        )
    if len(found) > 1:
        paths = sorted(jax.tree_util.keystr(p) for p, _ in found)
        raise ValueError(f"{len(found)} EMA states in this optimizer state, at {paths}; keep one.")
    return pure(found[0][1])


def ema_params(opt_state: Any) -> Any:
    """The EMA of the params held in ``opt_state``.

    Args:
      opt_state: an optimizer state containing an :func:`jema.ema_transform` state.

    Returns:
      A tree shaped like the params (masked leaves stay ``optax.MaskedNode``).

    Raises:
      ValueError: when ``opt_state`` holds no EMA, or several.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> jema.ema_params(jema.with_ema(optax.sgd(0.1)).init({"w": jnp.ones(2)}))["w"].tolist()
      [1.0, 1.0]
    """
    return find_ema_state(opt_state).ema


def ema_batch_stats(opt_state: Any) -> Any:
    """The EMA of the BatchNorm statistics, or None when none were attached.

    Args:
      opt_state: an optimizer state containing an :func:`jema.ema_transform` state.

    Returns:
      The averaged statistics, or None.

    Raises:
      ValueError: when ``opt_state`` holds no EMA, or several.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> jema.ema_batch_stats(jema.with_ema(optax.sgd(0.1)).init({"w": jnp.ones(2)})) is None
      True
    """
    return find_ema_state(opt_state).batch_stats


def ema_count(opt_state: Any) -> jax.Array:
    """How many optimizer steps the EMA has averaged.

    Args:
      opt_state: an optimizer state containing an :func:`jema.ema_transform` state.

    Returns:
      An int32 scalar array.

    Raises:
      ValueError: when ``opt_state`` holds no EMA, or several.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> int(jema.ema_count(jema.with_ema(optax.sgd(0.1)).init({"w": jnp.ones(2)})))
      0
    """
    return find_ema_state(opt_state).count


def attach_batch_stats(opt_state: Any, batch_stats: Any) -> Any:
    """Give the EMA its initial BatchNorm statistics (their values when the EMA is created).

    Afterwards ``tx.update(..., batch_stats=new_stats)`` averages them with the same decay
    as the weights, as SuperGradients averages running_mean/var inside ``ema_net``. Floating
    statistics are kept in at least the EMA's dtype (float32 for a float32 EMA of bf16 params).

    Args:
      opt_state: the state from ``tx.init(params)``; not modified.
      batch_stats: the model's batch statistics (e.g. ``variables["batch_stats"]``).

    Returns:
      A new optimizer state whose EMA holds a copy of ``batch_stats``.

    Raises:
      ValueError: when ``opt_state`` holds no EMA, several, or ``batch_stats`` is None.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> s = jema.with_ema(optax.sgd(0.1)).init({"w": jnp.ones(2)})
      >>> s = jema.attach_batch_stats(s, {"mean": jnp.zeros(2)})
      >>> jema.ema_batch_stats(s)["mean"].tolist()
      [0.0, 0.0]
    """
    if batch_stats is None:
        raise ValueError(
            "batch_stats is None; pass the model's statistics, e.g. variables['batch_stats']"
        )
    wider = shared_float_dtype(find_ema_state(opt_state).ema)
    copied = copy_floating(pure(batch_stats), wider, at_least=True)
    return jax.tree.map(
        lambda node: node._replace(batch_stats=copied) if _is_ema_state(node) else node,
        opt_state,
        is_leaf=_is_ema_state,
    )


def _is_ema_state(node: Any) -> bool:
    return isinstance(node, WeightEmaState)


def _ema_states_with_paths(tree: Any) -> list[tuple[Any, WeightEmaState]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_ema_state)
    return [(path, leaf) for path, leaf in leaves if _is_ema_state(leaf)]
