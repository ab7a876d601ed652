"""SuperGradients' EMA decay schedules: pure ``jnp`` functions and SG's class-based registry."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

ArrayLike = jax.typing.ArrayLike


def constant(decay: ArrayLike, step: ArrayLike, total_steps: ArrayLike | None = None) -> jax.Array:
    """The same decay at every step: ``d = decay``.

    Args:
      decay: the decay, in (0, 1).
      step: the 1-based optimizer step (may be traced); unused.
      total_steps: unused.

    Returns:
      ``decay`` as a float32 scalar (float64 when x64 is enabled).

    Example:
      >>> float(constant(0.9, step=5))
      0.8999999761581421
    """
    del total_steps
    return jnp.broadcast_to(jnp.asarray(decay, _float_dtype()), jnp.shape(step))


def threshold(decay: ArrayLike, step: ArrayLike, total_steps: ArrayLike | None = None) -> jax.Array:
    """TensorFlow's ``num_updates`` rule: ``d = min(decay, (1 + step) / (10 + step))``.

    Args:
      decay: the maximum decay, in (0, 1).
      step: the 1-based optimizer step (may be traced).
      total_steps: unused.

    Returns:
      The decay for ``step``; step 1 gives ``min(decay, 2/11)``.

    Example:
      >>> round(float(threshold(0.9999, step=1)), 6)
      0.181818
    """
    del total_steps
    s = jnp.asarray(step, _float_dtype())
    return jnp.minimum(jnp.asarray(decay, s.dtype), (1.0 + s) / (10.0 + s))


def exp(
    decay: ArrayLike, step: ArrayLike, total_steps: ArrayLike, beta: ArrayLike = 15.0
) -> jax.Array:
    """Exponential ramp: ``d = decay * (1 - exp(-beta * step / total_steps))``.

    Args:
      decay: the maximum decay, in (0, 1).
      step: the 1-based optimizer step (may be traced).
      total_steps: the length of training in optimizer steps, positive.
      beta: the ramp's steepness, positive; SG's default is 15.

    Returns:
      The decay for ``step``.

    Example:
      >>> round(float(exp(0.9, step=100, total_steps=100, beta=1.0)), 5)
      0.56891
    """
    s = jnp.asarray(step, _float_dtype())
    return jnp.asarray(decay, s.dtype) * (
        1.0 - jnp.exp(-jnp.asarray(beta, s.dtype) * s / total_steps)
    )


def _float_dtype() -> jnp.dtype:
    return jnp.dtype(jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32)


def _one_minus(decay: ArrayLike, dtype: jnp.dtype) -> jax.Array:
    """``1 - decay``, in Python's float64 when ``decay`` is a Python number, as SG computes it."""
    if isinstance(decay, (int, float)):
        return jnp.asarray(1.0 - decay, dtype)
    return 1 - jnp.asarray(decay, dtype)


class IDecayFunction:
    """SuperGradients' decay-function interface: subclass it and implement ``__call__``.

    ``step`` arrives as a traced integer array, so implementations must use ``jax.numpy``
    (``jnp.exp``, ``jnp.minimum``), never ``math`` or ``numpy`` on it.

    Example:
      >>> class LinearDecay(IDecayFunction):
      ...     def __call__(self, decay, step, total_steps):
      ...         return decay * step / total_steps
      >>> EMA_DECAY_FUNCTIONS["linear"] = LinearDecay
      >>> float(LinearDecay()(0.9, 5, 10))
      0.45
      >>> del EMA_DECAY_FUNCTIONS["linear"]
    """

    def __init__(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(
                f"{type(self).__name__} takes no options; got {sorted(kwargs)}. "
                "Options are only for schedules that declare them (e.g. beta for 'exp')."
            )

    def __call__(self, decay: ArrayLike, step: ArrayLike, total_steps: ArrayLike | None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def complement(self, decay: ArrayLike, step: ArrayLike, total_steps: ArrayLike | None) -> Any:
        """``1 - self(decay, step, total_steps)``; override to compute it without cancellation.

        SuperGradients forms ``1 - d`` in float64; in float32, ``1 - d`` loses digits when ``d``
        is near 1 (0.999 -> 1.3e-5 relative error), so the built-in schedules override this.

        Args:
          decay: the maximum decay.
          step: the 1-based optimizer step (may be traced).
          total_steps: the length of training, or None.

        Returns:
          ``1 - d`` as a float scalar (or an array shaped like ``step``).

        Example:
          >>> float(ThresholdDecay().complement(0.9999, 1, None)) == float(jnp.float32(9 / 11))
          True
        """
        return 1 - jnp.asarray(self(decay, step, total_steps))


class _IgnoresBeta(IDecayFunction):
    """A schedule without options that still accepts SG's ``beta`` key, as SG's classes do.

    SuperGradients' recipes carry ``beta`` in ``ema_params`` whatever the decay_type, and its
    ``constant``/``threshold`` classes ignore it; any other option is an error here.
    """

    def __init__(self, beta: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)


class ConstantDecay(_IgnoresBeta):
    """``decay_type="constant"``: see :func:`jema.constant` (accepts and ignores ``beta``)."""

    def __call__(self, decay, step, total_steps):
        return constant(decay, step, total_steps)

    def complement(self, decay, step, total_steps):
        return jnp.broadcast_to(_one_minus(decay, _float_dtype()), jnp.shape(step))


class ThresholdDecay(_IgnoresBeta):
    """``decay_type="threshold"``: see :func:`jema.threshold` (accepts and ignores ``beta``)."""

    def __call__(self, decay, step, total_steps):
        return threshold(decay, step, total_steps)

    def complement(self, decay, step, total_steps):
        s = jnp.asarray(step, _float_dtype())
        return jnp.maximum(_one_minus(decay, s.dtype), 9.0 / (10.0 + s))


class ExpDecay(IDecayFunction):
    """``decay_type="exp"``: see :func:`jema.exp`; needs ``total_steps``.

    Args:
      beta: the ramp's steepness, a positive number (SG's default 15).

    Raises:
      ValueError: when ``beta`` is not a positive finite number.
    """

    needs_total_steps = True

    def __init__(self, beta: float = 15.0) -> None:
        super().__init__()
        if (
            isinstance(beta, bool)
            or not isinstance(beta, numbers.Real)
            or not 0 < beta < float("inf")
        ):
            raise ValueError(f"beta must be a positive finite number; got {beta!r}")
        self.beta = float(beta)

    def __call__(self, decay, step, total_steps):
        return exp(decay, step, total_steps, beta=self.beta)

    def complement(self, decay, step, total_steps):
        s = jnp.asarray(step, _float_dtype())
        ramp = jnp.exp(-self.beta * s / total_steps)
        return _one_minus(decay, s.dtype) + jnp.asarray(decay, s.dtype) * ramp


EMA_DECAY_FUNCTIONS: dict[str, type[IDecayFunction]] = {
    "constant": ConstantDecay,
    "threshold": ThresholdDecay,
    "exp": ExpDecay,
}
