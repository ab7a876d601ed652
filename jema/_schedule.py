"""Turning ``(decay, decay_type, total_steps, options)`` into a checked, traceable ``step -> d``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jema._decay import EMA_DECAY_FUNCTIONS, IDecayFunction


def resolve_decay_fn(
    decay: Any, decay_type: str, total_steps: Any, options: dict[str, Any]
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """Validate the EMA's settings and return ``step -> decay`` for the registered schedule.

    Args:
      decay: the maximum decay, strictly inside (0, 1); may be a traced array (as under
        ``optax.inject_hyperparams``), which is then not checked.
      decay_type: a key of :data:`jema.EMA_DECAY_FUNCTIONS`.
      total_steps: None or a positive number of optimizer steps (may be traced).
      options: keyword arguments for the schedule class's constructor.

    Returns:
      A function of the 1-based step (an int32 array) giving ``(d, 1 - d)`` as float scalars,
      the complement computed without cancellation (see ``IDecayFunction.complement``).

    Raises:
      ValueError: bad decay, unknown decay_type, bad or missing total_steps.
      TypeError: a schedule that cannot be traced, or bad options.

    Example:
      >>> fn = resolve_decay_fn(0.9, "constant", None, {})
      >>> [round(float(x), 4) for x in fn(jax.numpy.int32(3))]
      [0.9, 0.1]
    """
    _check_decay(decay)
    _check_total_steps(total_steps)
    schedule = _build_schedule(decay_type, _unwrap_injected_options(options))
    if total_steps is None and getattr(schedule, "needs_total_steps", False):
        raise ValueError(
            f"decay_type={decay_type!r} needs total_steps, the number of optimizer steps in "
            "training, a positive int; got None. Pass e.g. "
            f"ema_transform(decay_type={decay_type!r}, total_steps=len(loader) * epochs)."
        )

    def decay_fn(step: jax.Array) -> tuple[jax.Array, jax.Array]:
        d = jnp.asarray(schedule(decay, step, total_steps))
        return d, jnp.asarray(schedule.complement(decay, step, total_steps), d.dtype)

    if not _is_traced(decay) and not _is_traced(total_steps):
        _probe(decay_fn, decay_type, total_steps)
    return decay_fn


def _build_schedule(decay_type: str, options: dict[str, Any]) -> IDecayFunction:
    if not isinstance(decay_type, str) or decay_type not in EMA_DECAY_FUNCTIONS:
        raise ValueError(
            f"unknown decay_type {decay_type!r}; registered: {sorted(EMA_DECAY_FUNCTIONS)}. "
            'Register your own with jema.EMA_DECAY_FUNCTIONS["name"] = YourDecayClass.'
        )
    cls = EMA_DECAY_FUNCTIONS[decay_type]
    try:
        return cls(**options)
    except TypeError as e:
        raise TypeError(f"decay_type={decay_type!r} does not accept options {options}: {e}") from e


def _unwrap_injected_options(options: dict[str, Any]) -> dict[str, Any]:
    # optax.inject_hyperparams re-calls the factory with the bound ``decay_kwargs`` dict as
    # one keyword named "decay_kwargs"; flatten it back into the schedule's options.
    nested = options.get("decay_kwargs")
    if isinstance(nested, dict):
        return {**{k: v for k, v in options.items() if k != "decay_kwargs"}, **nested}
    return options


def _probe(decay_fn: Callable, decay_type: str, total_steps: Any) -> None:
    step = jax.ShapeDtypeStruct((), jnp.int32)
    try:
        out, _ = jax.eval_shape(decay_fn, step)
    except jax.errors.ConcretizationTypeError as e:
        raise TypeError(_untraceable(decay_type, e)) from e
    except TypeError as e:
        if total_steps is None and "NoneType" in str(e):
            raise ValueError(
                f"decay_type={decay_type!r} uses total_steps, but total_steps is None; "
                "pass ema_transform(..., total_steps=<number of optimizer steps>)."
            ) from e
        raise TypeError(_untraceable(decay_type, e)) from e
    if out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            f"decay_type={decay_type!r} must return a float scalar; it returned "
            f"shape {out.shape} dtype {out.dtype}."
        )


def _untraceable(decay_type: str, error: Exception) -> str:
    return (
        f"decay_type={decay_type!r} cannot be traced by JAX: `step` is a traced array, so the "
        "schedule must use jax.numpy (jnp.exp, jnp.minimum, jnp.where) instead of math/numpy "
        f"functions or Python `if` on it. Original error: {type(error).__name__}: {error}"
    )


def _check_decay(decay: Any) -> None:
    if _is_traced(decay):
        return
    value = _as_real(decay)
    if value is None or not 0.0 < value < 1.0:
        hint = _low_precision_hint(decay)
        raise ValueError(f"decay must be a number strictly inside (0, 1); got {decay!r}{hint}")


def _low_precision_hint(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits > 16:
        return ""
    return (
        f". A {jnp.dtype(dtype).name} decay comes from optax.inject_hyperparams, which casts "
        "hyperparameters to the params' dtype: pass hyperparam_dtype=jnp.float32 to it."
    )


def _check_total_steps(total_steps: Any) -> None:
    if total_steps is None or _is_traced(total_steps):
        return
    value = _as_real(total_steps)
    if value is None or not (0 < value < math.inf):
        raise ValueError(
            f"total_steps must be a positive number of optimizer steps; got {total_steps!r}"
        )
    if value != int(value):
        raise ValueError(f"total_steps must be a whole number of steps; got {total_steps!r}")


def _as_real(x: Any) -> float | None:
    """``x`` as a float when it is a real number or a real scalar array, else None."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.ndarray, jax.Array)):
        return None
    if np.ndim(x) != 0:
        return None
    dtype = np.asarray(x).dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        return None
    return float(x)


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)
