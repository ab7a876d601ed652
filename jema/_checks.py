"""The checks of the user's settings, each rule once, every refusal as ``{name} must {rule};
got {value!r}``.

:func:`check_number` is the one range check of every numeric option (decays, widths, steps,
coefficients); :func:`check_floating_dtype` the one dtype check; :func:`is_floating` the one
floating test. numpy's ``np.issubdtype(bfloat16, np.floating)`` is False for ml_dtypes'
bfloat16 and float8, so a floating test written with numpy takes the wrong branch silently for
them; :func:`is_floating` knows them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Kind = Literal["real", "whole", "int"]
Closed = Literal["", "low", "high", "both"]


def is_floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating dtype, ml_dtypes' bfloat16 and float8 included.

    Args:
      dtype: a dtype, or anything ``jnp.dtype`` takes.

    Returns:
      True for float16/32/64, bfloat16 and the float8 dtypes; False otherwise (complex too).

    Example:
      >>> import ml_dtypes, numpy as np
      >>> is_floating(ml_dtypes.bfloat16), np.issubdtype(ml_dtypes.bfloat16, np.floating)
      (True, False)
      >>> is_floating("int32"), is_floating("complex64")
      (False, False)
    """
    return bool(jnp.issubdtype(dtype, jnp.floating))


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer (a value known only when the function runs).

    Args:
      x: any value.

    Returns:
      True for a tracer.

    Example:
      >>> is_traced(1.0)
      False
    """
    return isinstance(x, jax.core.Tracer)


def real_inside(x: Any, low: float, high: float) -> float | None:
    """``x`` as a float when it is a real number (or real scalar array) in ``(low, high)``.

    Args:
      x: any value; bools are not numbers here.
      low: the open interval's lower end.
      high: the open interval's upper end.

    Returns:
      The float, or None when ``x`` is not a real number or lies outside.

    Example:
      >>> real_inside(0.5, 0, 1), real_inside(1, 0, 1), real_inside("0.5", 0, 1)
      (0.5, None, None)
    """
    value = _real(x)
    return float(value) if value is not None and low < value < high else None


def check_number(
    value: Any,
    name: str,
    rule: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    closed: Closed = "",
    kind: Kind = "real",
    wrong_type: type[Exception] = ValueError,
) -> Any:
    """``value`` when it is a number of ``kind`` in the interval from ``low`` to ``high``.

    Args:
      value: any value; bools are never numbers, 0-d numpy and jax arrays are.
      name: the setting's name, as the user wrote it.
      rule: what is allowed, as a verb phrase for the message ("be a positive int").
      low: the interval's lower end.
      high: its upper end.
      closed: the ends that belong to it: ``""`` (neither), ``"low"``, ``"high"`` or ``"both"``.
      kind: ``"real"`` any real number (returned as a float); ``"whole"`` a whole value, 2.0
        too (returned as an int); ``"int"`` an integer type (returned as an int).
      wrong_type: the exception raised when ``value`` is not a number of ``kind``.

    Returns:
      The number as a Python float or int.

    Raises:
      ValueError: ``{name} must {rule}; got {value!r}`` when it lies outside (or NaN), and
        when it is not a number of ``kind`` unless ``wrong_type`` says otherwise.

    Example:
      >>> check_number(np.int64(4), "every_k_steps", "be a positive int", low=0, kind="int")
      4
      >>> check_number(1.0, "coeff", "be a number in [0, 1)", low=0, high=1, closed="low")
      Traceback (most recent call last):
      ...
      ValueError: coeff must be a number in [0, 1); got 1.0
    """
    message = f"{name} must {rule}; got {_shown(value)}"
    real = _real(value)
    integer_typed = isinstance(value, numbers.Integral) or jnp.issubdtype(
        getattr(value, "dtype", float), jnp.integer
    )
    if (
        real is None
        or (kind == "int" and not integer_typed)
        or (kind == "whole" and not (integer_typed or float(real).is_integer()))
    ):
        raise wrong_type(message)
    above = real >= low if closed in ("low", "both") else real > low
    below = real <= high if closed in ("high", "both") else real < high
    if not (above and below):
        raise ValueError(message)
    if kind != "real":
        return int(value) if integer_typed else int(real)
    try:
        return float(real)
    except OverflowError:  # a Python int past any float
        raise ValueError(message) from None


def check_floating_dtype(dtype: Any, name: str, example: str) -> np.dtype:
    """``dtype`` as a numpy dtype when it is floating (bfloat16 and float8 included).

    Args:
      dtype: anything ``jnp.dtype`` takes.
      name: the setting's name.
      example: a floating dtype as the user would write it, for the message.

    Returns:
      The dtype.

    Raises:
      ValueError: ``{name} must be a floating dtype such as {example}; got {dtype!r}`` when it
        is not a dtype or not floating; for an array (``optax.inject_hyperparams`` calls
        dtypes as schedules) it also says to pass ``static_args``.

    Example:
      >>> check_floating_dtype("bfloat16", "dtype", "'float32'")
      dtype(bfloat16)
    """
    message = f"{name} must be a floating dtype such as {example}; got {dtype!r}"
    if isinstance(dtype, (jax.Array, np.ndarray)):
        raise ValueError(
            f"{message}. Under optax.inject_hyperparams, dtypes are called as schedules: pass "
            f"static_args={name!r} to it."
        )
    try:
        checked = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(message) from e
    if not is_floating(checked):
        raise ValueError(message)
    return checked


def _real(x: Any) -> float | int | None:
    """``x`` as a float when it is a real number or a real 0-d array, a Python int as itself
    (compared with the bounds exactly, whatever its size), else None (a tracer too: its value
    is not known)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.ndarray, np.generic, jax.Array)):
        return None
    if is_traced(x):
        return None
    if isinstance(x, numbers.Integral) and not isinstance(x, (np.generic, jax.Array)):
        return int(x)
    if getattr(x, "ndim", 0) != 0:
        return None
    dtype = np.asarray(x).dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or is_floating(dtype)):
        return None
    return float(x)


def _shown(value: Any) -> str:
    """``repr(value)`` for a message, its middle left out when it is long (a huge int)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:40]}...{text[-20:]} ({len(text)} characters)"
