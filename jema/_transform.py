"""The EMA of model weights as an optax ``GradientTransformationExtraArgs``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src.base import NO_PARAMS_MSG

from jema._schedule import resolve_decay_fn


class WeightEmaState(NamedTuple):
    """State of :func:`ema_transform`.

    Attributes:
      count: number of optimizer steps averaged so far.
      ema: the averaged weights, a tree shaped like the params, in the EMA dtype.
      batch_stats: averaged BatchNorm statistics, or None until
        :func:`jema.attach_batch_stats` gives the EMA its initial ones.
    """

    count: jax.Array  # shape=(), int32
    ema: optax.Params  # tree of the params' shapes, ema_dtype (default: each param's dtype)
    batch_stats: Any  # None, or a tree of the model's batch statistics' shapes


def ema_transform(
    decay: float = 0.9999,
    decay_type: str = "threshold",
    *,
    total_steps: int | None = None,
    ema_dtype: Any = None,
    **decay_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
    """SuperGradients' EMA of the weights, as the last element of an optax chain.

    ``updates`` pass through unchanged. The n-th update (n = 1, 2, ...) averages the
    post-step weights ``params + updates`` with ``d = decay_fn(decay, n, total_steps)``:
    ``ema = ema * d + (1 - d) * new_params``, computed in the EMA dtype (at least float32,
    so the decay is never rounded to a low-precision dtype). Non-floating leaves keep their
    initial value; ``None`` leaves pass through. Pass ``batch_stats=`` to ``update`` to
    average BatchNorm statistics too, after :func:`jema.attach_batch_stats`.

    Args:
      decay: the (maximum) decay, strictly inside (0, 1).
      decay_type: a name in :data:`jema.EMA_DECAY_FUNCTIONS` ("constant", "threshold",
        "exp", or one you registered).
      total_steps: number of optimizer steps in training; needed by "exp" and by any
        schedule that uses it.
      ema_dtype: dtype of the averaged weights (e.g. ``jnp.float32`` for bf16 params);
        None keeps each param's dtype.
      **decay_kwargs: options for the schedule's class, e.g. ``beta=15`` for "exp".

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: a decay outside (0, 1), an unknown decay_type, a missing or
        non-positive total_steps where the schedule needs it, a bad schedule option.
      TypeError: a schedule that cannot be traced by JAX.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> tx = optax.chain(optax.sgd(0.1), jema.ema_transform(0.9, "constant"))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
      >>> [round(x, 6) for x in jema.ema_params(state)["w"].tolist()]  # 0.9 * 1 + 0.1 * 0.9
      [0.99, 0.99]
    """
    decay_fn = resolve_decay_fn(decay, decay_type, total_steps, decay_kwargs)
    ema_dtype = None if ema_dtype is None else jnp.dtype(ema_dtype)

    def init_fn(params: optax.Params) -> WeightEmaState:
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        ema = jax.tree.map(_copy_leaf(ema_dtype), params, is_leaf=lambda x: x is None)
        return WeightEmaState(count=jnp.zeros([], jnp.int32), ema=ema, batch_stats=None)

    def update_fn(
        updates: optax.Updates,
        state: WeightEmaState,
        params: optax.Params | None = None,
        *,
        batch_stats: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, WeightEmaState]:
        del extra_args
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        count = optax.safe_increment(state.count)
        weights = decay_fn(count)
        new_params = optax.apply_updates(params, updates)
        ema = average_tree(state.ema, new_params, weights)
        stats = state.batch_stats
        if batch_stats is not None:
            stats = average_tree(stats, batch_stats, weights, name="batch_stats", attached=stats)
        return updates, WeightEmaState(count=count, ema=ema, batch_stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def with_ema(
    optimizer: optax.GradientTransformation, **ema_kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """``optimizer`` chained with :func:`ema_transform` last, so the EMA sees the new weights.

    Args:
      optimizer: any optax transformation (e.g. ``optax.adam(1e-3)``).
      **ema_kwargs: the arguments of :func:`ema_transform`.

    Returns:
      ``optax.chain(optimizer, ema_transform(**ema_kwargs))``.

    Raises:
      ValueError, TypeError: as :func:`ema_transform`.

    Example:
      >>> import optax, jema
      >>> tx = jema.with_ema(optax.adam(1e-3), decay=0.999, decay_type="threshold")
    """
    return optax.chain(optimizer, ema_transform(**ema_kwargs))


def average_tree(
    ema: Any,
    new: Any,
    weights: tuple[jax.Array, jax.Array],
    *,
    name: str = "params",
    attached: Any = True,
) -> Any:
    """``ema * d + (1 - d) * new`` on every floating leaf; other leaves keep ``ema``.

    Args:
      ema: the running average.
      new: the newest values, same structure as ``ema``.
      weights: ``(d, 1 - d)``, float scalars.
      name: what the trees hold, for error messages.
      attached: None when no EMA was attached for ``name`` (then averaging is an error).

    Returns:
      The new average, same structure and dtypes as ``ema``.

    Raises:
      ValueError: when nothing was attached, or the structures differ.
    """
    if attached is None:
        raise ValueError(
            f"update(..., {name}=...) was given but the EMA holds no {name}: call "
            f"jema.attach_batch_stats(opt_state, {name}) once after tx.init(params)."
        )
    is_none = lambda x: x is None  # noqa: E731
    ema_def = jax.tree.structure(ema, is_leaf=is_none)
    new_def = jax.tree.structure(new, is_leaf=is_none)
    if ema_def != new_def:
        raise ValueError(
            f"the {name} given to update have a different structure from the EMA's: "
            f"{_structure_diff(ema, new)}"
        )
    return jax.tree.map(lambda e, n: _average_leaf(e, n, weights), ema, new, is_leaf=is_none)


def _average_leaf(ema: Any, new: Any, weights: tuple[jax.Array, jax.Array]) -> Any:
    if ema is None or not jnp.issubdtype(ema.dtype, jnp.floating):
        return ema
    compute = jnp.promote_types(ema.dtype, jnp.float32)
    d, one_minus_d = (jnp.asarray(w, compute) for w in weights)
    mixed = ema.astype(compute) * d + one_minus_d * jnp.asarray(new).astype(compute)
    return mixed.astype(ema.dtype)


def _copy_leaf(ema_dtype: jnp.dtype | None):
    def copy(x: Any) -> Any:
        if x is None:
            return None
        x = jnp.asarray(x)
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return jnp.array(
            x, dtype=ema_dtype if ema_dtype is not None and floating else None, copy=True
        )

    return copy


def _structure_diff(expected: Any, got: Any) -> str:
    is_none = lambda x: x is None  # noqa: E731
    paths_expected = {
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(expected, is_leaf=is_none)
    }
    paths_got = {
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(got, is_leaf=is_none)
    }
    missing = sorted(paths_expected - paths_got)
    unexpected = sorted(paths_got - paths_expected)
    if not missing and not unexpected:
        return "same paths, different container types"
    return f"missing {missing[:10]}, unexpected {unexpected[:10]}"
