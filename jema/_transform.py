"""The EMA of model weights as an optax ``GradientTransformationExtraArgs``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jema._schedules import check_every_k_steps, decay_weights_fn, valid_weights
from jema._state import WeightEmaState
from jema._trees import all_finite, average_tree, check_same_structure, copy_floating

NO_PARAMS = (
    "ema_transform requires the current value of parameters: pass them to update, "
    "tx.update(grads, opt_state, params), and to init, tx.init(params)."
)
ATTACH_HINT = "call jema.attach_batch_stats(opt_state, batch_stats) once after tx.init(params)."


def ema_transform(
    decay: float = 0.9999,
    decay_type: str = "threshold",
    *,
    total_steps: int | None = None,
    ema_dtype: Any = None,
    every_k_steps: int = 1,
    skip_nonfinite: bool = False,
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
      every_k_steps: average only on every k-th optimizer step, with decay ``d ** k`` (the
        same averaging window); the work is skipped on the other steps. 1 is SG's behaviour.
      skip_nonfinite: when the new weights (or batch statistics) hold a NaN or Inf, or the
        schedule's ``d`` is NaN or outside [0, 1] at this step, keep the EMA and its count as
        they were for that step.
      **decay_kwargs: options for the schedule's class, e.g. ``beta=15`` for "exp".

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: a decay outside (0, 1), an unknown decay_type, a missing or
        non-positive total_steps where the schedule needs it, a bad schedule option,
        every_k_steps not a positive int.
      TypeError: a schedule that cannot be traced by JAX, a non-floating ema_dtype,
        a non-bool skip_nonfinite.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> tx = optax.chain(optax.sgd(0.1), jema.ema_transform(0.9, "constant"))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(2)}, state, params)
      >>> [round(x, 6) for x in jema.ema_params(state)["w"].tolist()]  # 0.9 * 1 + 0.1 * 0.9
      [0.99, 0.99]
    """
    k = check_every_k_steps(every_k_steps)
    weights_at = decay_weights_fn(decay, decay_type, total_steps, decay_kwargs, k)
    ema_dtype = _check_ema_dtype(ema_dtype)
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be True or False; got {skip_nonfinite!r}")

    def init_fn(params: optax.Params) -> WeightEmaState:
        if params is None:
            raise ValueError(NO_PARAMS)
        ema = copy_floating(params, ema_dtype)
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
            raise ValueError(NO_PARAMS)
        check_same_structure(state.ema, params, "params")
        if batch_stats is not None:
            check_same_structure(state.batch_stats, batch_stats, "batch_stats", ATTACH_HINT)
        count = optax.safe_increment(state.count)

        weights = weights_at(count)

        def average(_: None) -> tuple[Any, Any]:
            ema = average_tree(state.ema, optax.apply_updates(params, updates), weights)
            if batch_stats is None:
                return ema, state.batch_stats
            return ema, average_tree(state.batch_stats, batch_stats, weights)

        if isinstance(k, int) and k == 1 and not skip_nonfinite:
            ema, stats = average(None)
        else:
            due = count % k == 0
            if skip_nonfinite:
                finite = all_finite(optax.apply_updates(params, updates), batch_stats)
                finite = jnp.logical_and(finite, valid_weights(weights))
                due = jnp.logical_and(due, finite)
                count = jnp.where(finite, count, state.count)
            ema, stats = jax.lax.cond(due, average, lambda _: (state.ema, state.batch_stats), None)
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


def _check_ema_dtype(ema_dtype: Any) -> jnp.dtype | None:
    if ema_dtype is None:
        return None
    message = f"ema_dtype must be a floating dtype such as jnp.float32; got {ema_dtype!r}"
    if isinstance(ema_dtype, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{message}. Under optax.inject_hyperparams, dtypes are called as schedules: pass "
            "static_args='ema_dtype' to it."
        )
    try:
        dtype = jnp.dtype(ema_dtype)
    except TypeError as e:
        raise TypeError(message) from e
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(message)
    return dtype
