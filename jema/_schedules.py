"""Every EMA decay: SuperGradients' three schedules and registry, and the every-k power.

Each schedule is written once, as a function giving ``(d, 1 - d)`` side by side: ``1 - d`` is
formed without cancellation (SuperGradients forms it in float64; in float32, ``1 - d`` for
``d`` near 1 would lose digits). :func:`decay_weights_fn` turns the user's settings into the
checked, traceable ``step -> (d, 1 - d)`` the transform uses, raised to the k-th power when
it averages every k steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jema._checks import check_number, is_floating, is_traced, real_inside

ArrayLike = jax.typing.ArrayLike
Weights = tuple[jax.Array, jax.Array]
STEP_LIMIT = 2**31 - 1  # the last step the int32 counter reaches (optax.safe_increment)
PROBES = 64  # steps at which a schedule's values are checked when the transform is built


def _constant_weights(decay: ArrayLike, step: ArrayLike) -> Weights:
    dtype, shape = _float_dtype(), jnp.shape(step)
    d = jnp.asarray(decay, dtype)
    return jnp.broadcast_to(d, shape), jnp.broadcast_to(_one_minus(decay, dtype), shape)


def _threshold_weights(decay: ArrayLike, step: ArrayLike) -> Weights:
    s = jnp.asarray(step, _float_dtype())
    d = jnp.minimum(jnp.asarray(decay, s.dtype), (1.0 + s) / (10.0 + s))
    return d, jnp.maximum(_one_minus(decay, s.dtype), 9.0 / (10.0 + s))


def _exp_weights(
    decay: ArrayLike, step: ArrayLike, total_steps: ArrayLike, beta: ArrayLike
) -> Weights:
    s = jnp.asarray(step, _float_dtype())
    ramp = jnp.exp(-jnp.asarray(beta, s.dtype) * s / total_steps)
    d = jnp.asarray(decay, s.dtype)
    return d * (1.0 - ramp), _one_minus(decay, s.dtype) + d * ramp


def _warmup_weights(
    decay: ArrayLike,
    step: ArrayLike,
    inv_gamma: float,
    power: float,
    min_decay: float,
    update_after_step: int,
) -> Weights:
    s = jnp.maximum(jnp.asarray(step, _float_dtype()) - update_after_step - 1.0, 0.0)
    log_keep = -power * jnp.log1p(s / inv_gamma)  # log of (1 + s / inv_gamma) ** -power
    d = jnp.clip(-jnp.expm1(log_keep), min_decay, jnp.asarray(decay, s.dtype))
    one_minus_d = jnp.clip(jnp.exp(log_keep), _one_minus(decay, s.dtype), 1.0 - min_decay)
    copying = s == 0  # the EMA becomes a copy until the warm-up starts
    return jnp.where(copying, 0.0, d), jnp.where(copying, 1.0, one_minus_d)


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
    return _constant_weights(decay, step)[0]


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
    return _threshold_weights(decay, step)[0]


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
    return _exp_weights(decay, step, total_steps, beta)[0]


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


class _BuiltIn(IDecayFunction):
    """A built-in schedule: ``__call__`` and ``complement`` read one ``(d, 1 - d)`` function."""

    def _weights(self, decay: ArrayLike, step: ArrayLike, total_steps: ArrayLike | None) -> Weights:
        raise NotImplementedError

    def __call__(self, decay, step, total_steps):
        return self._weights(decay, step, total_steps)[0]

    def complement(self, decay, step, total_steps):
        return self._weights(decay, step, total_steps)[1]


class _IgnoresBeta(_BuiltIn):
    """A schedule without options that still accepts SG's ``beta`` key, as SG's classes do.

    SuperGradients' recipes carry ``beta`` in ``ema_params`` whatever the decay_type, and its
    ``constant``/``threshold`` classes ignore it; any other option is an error here.
    """

    def __init__(self, beta: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)


class ConstantDecay(_IgnoresBeta):
    """``decay_type="constant"``: see :func:`jema.constant` (accepts and ignores ``beta``)."""

    def _weights(self, decay, step, total_steps):
        return _constant_weights(decay, step)


class ThresholdDecay(_IgnoresBeta):
    """``decay_type="threshold"``: see :func:`jema.threshold` (accepts and ignores ``beta``)."""

    def _weights(self, decay, step, total_steps):
        return _threshold_weights(decay, step)


class ExpDecay(_BuiltIn):
    """``decay_type="exp"``: see :func:`jema.exp`; needs ``total_steps``.

    Args:
      beta: the ramp's steepness, a positive number (SG's default 15).

    Raises:
      ValueError: when ``beta`` is not a positive finite number.
    """

    needs_total_steps = True

    def __init__(self, beta: float = 15.0) -> None:
        super().__init__()
        self.beta = check_number(beta, "beta", "be a positive finite number", low=0.0)

    def _weights(self, decay, step, total_steps):
        return _exp_weights(decay, step, total_steps, self.beta)


class WarmupDecay(_BuiltIn):
    """``decay_type="warmup"``: the warm-up of timm, ema-pytorch and diffusers.

    With ``s = max(0, n - update_after_step - 1)`` at the 1-based step n: ``d = 0`` while
    ``s = 0`` (the EMA becomes a copy), else
    ``clip(1 - (1 + s / inv_gamma) ** -power, min_decay, decay)``; timm's
    ``ModelEmaV3(use_warmup=True)``, ema-pytorch's ``EMA`` and diffusers'
    ``EMAModel(use_ema_warmup=True)`` give the same numbers.

    Args:
      inv_gamma: the warm-up's time scale in steps, positive.
      power: its exponent, positive (2/3 for long runs, 3/4 for short ones).
      min_decay: the decay's floor, in [0, 1).
      update_after_step: steps that only copy the weights, a non-negative int.

    Raises:
      ValueError: naming the option that is out of range.

    Example:
      >>> round(float(WarmupDecay()(0.9999, 100, None)), 6)  # timm's value at step 100
      0.953584
    """

    def __init__(
        self,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_decay: float = 0.0,
        update_after_step: int = 0,
    ) -> None:
        super().__init__()
        self.inv_gamma = check_number(inv_gamma, "inv_gamma", "be a positive number", low=0.0)
        self.power = check_number(power, "power", "be a positive number", low=0.0)
        self.min_decay = check_number(
            min_decay, "min_decay", "be a number in [0, 1)", low=0.0, high=1.0, closed="low"
        )
        self.update_after_step = check_number(
            update_after_step,
            "update_after_step",
            "be a non-negative int",
            low=0,
            high=STEP_LIMIT,
            closed="low",
            kind="int",
        )

    def _weights(self, decay, step, total_steps):
        return _warmup_weights(
            decay, step, self.inv_gamma, self.power, self.min_decay, self.update_after_step
        )


EMA_DECAY_FUNCTIONS: dict[str, type[IDecayFunction]] = {
    "constant": ConstantDecay,
    "threshold": ThresholdDecay,
    "exp": ExpDecay,
    "warmup": WarmupDecay,
}


def decay_weights_fn(
    decay: Any,
    decay_type: str,
    total_steps: Any,
    options: dict[str, Any],
    every_k_steps: Any = 1,
) -> Callable[[jax.Array], Weights]:
    """Validate the EMA's settings and return ``step -> (d, 1 - d)`` for the registered schedule.

    Args:
      decay: the maximum decay, strictly inside (0, 1); may be a traced array (as under
        ``optax.inject_hyperparams``), which is then not checked; or an optax schedule, a
        function of the count called as optax calls learning-rate schedules (0 at the first
        update), whose value is the decay the schedule receives at that step.
      decay_type: a key of :data:`jema.EMA_DECAY_FUNCTIONS`.
      total_steps: None or a positive number of optimizer steps (may be traced).
      options: keyword arguments for the schedule class's constructor.
      every_k_steps: a positive int k (may be traced): the weights become ``(d**k, 1 - d**k)``,
        formed through ``log1p``/``expm1``, for an EMA that averages every k-th step.

    Returns:
      A function of the 1-based step (an int32 array) giving ``(d, 1 - d)`` as float scalars,
      the complement computed without cancellation (see ``IDecayFunction.complement``).

    Raises:
      ValueError: bad decay, unknown decay_type, bad or missing total_steps, bad every_k_steps,
        a schedule whose ``d`` or ``1 - d`` is NaN or outside [0, 1] at a probed step (a spread
        of steps from 1 to ``total_steps``, or to the int32 step counter's end without it).
      TypeError: a schedule that cannot be traced, or bad options.

    Example:
      >>> fn = decay_weights_fn(0.9, "constant", None, {})
      >>> [round(float(x), 4) for x in fn(jax.numpy.int32(3))]
      [0.9, 0.1]
      >>> [round(float(x), 4) for x in decay_weights_fn(0.9, "constant", None, {}, 2)(3)]
      [0.81, 0.19]
    """
    if not callable(decay):
        _check_decay(decay)
    _check_total_steps(total_steps)
    every_k_steps = check_every_k_steps(every_k_steps)
    schedule = _build_schedule(decay_type, _unwrap_injected_options(options))
    if total_steps is None and getattr(schedule, "needs_total_steps", False):
        raise ValueError(
            f"decay_type={decay_type!r} needs total_steps, the number of optimizer steps in "
            "training, a positive int; got None. Pass e.g. "
            f"ema_transform(decay_type={decay_type!r}, total_steps=len(loader) * epochs)."
        )

    def once(step: jax.Array) -> Weights:
        value = decay(jnp.asarray(step) - 1) if callable(decay) else decay  # optax's count
        d = jnp.asarray(schedule(value, step, total_steps))
        return d, jnp.asarray(schedule.complement(value, step, total_steps), d.dtype)

    if not is_traced(decay) and not is_traced(total_steps):
        _probe(once, decay_type, total_steps)
        _probe_values(once, decay_type, total_steps)
    if isinstance(every_k_steps, int) and every_k_steps == 1:
        return once

    def powered(step: jax.Array) -> Weights:
        d, one_minus_d = once(step)
        k_log_d = every_k_steps * jnp.log1p(-one_minus_d)
        k_is_1 = jnp.asarray(every_k_steps) == 1
        return (
            jnp.where(k_is_1, d, jnp.exp(k_log_d)),
            jnp.where(k_is_1, one_minus_d, -jnp.expm1(k_log_d)),
        )

    return powered


def check_every_k_steps(every_k_steps: Any) -> int | jax.Array:
    """``every_k_steps`` as a Python int, or as is when traced (``optax.inject_hyperparams``
    under ``jit`` injects it; the update then turns the EMA into NaN on a step where it is
    below 1, since nothing can raise there).

    Args:
      every_k_steps: a positive int, an integer scalar array, or a tracer.

    Returns:
      The int, or the tracer.

    Raises:
      ValueError: when it is not a positive integer.

    Example:
      >>> check_every_k_steps(np.int64(4))
      4
    """
    if is_traced(every_k_steps):
        return every_k_steps
    return check_number(
        every_k_steps,
        "every_k_steps",
        f"be a positive int at most {STEP_LIMIT} (the int32 step counter)",
        low=0,
        high=STEP_LIMIT,
        closed="high",
        kind="int",
    )


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
    if out.shape != () or not is_floating(out.dtype):
        raise TypeError(
            f"decay_type={decay_type!r} must return a float scalar; it returned "
            f"shape {out.shape} dtype {out.dtype}."
        )


def valid_weights(weights: Weights) -> jax.Array:
    """True when ``d`` and ``1 - d`` are both in [0, 1] (so neither is NaN or infinite).

    Args:
      weights: ``(d, 1 - d)`` arrays.

    Returns:
      A boolean array shaped like ``d``.

    Example:
      >>> valid_weights((jnp.array([0.9, 1.5]), jnp.array([0.1, -0.5]))).tolist()
      [True, False]
    """
    d, one_minus_d = weights
    return (d >= 0) & (d <= 1) & (one_minus_d >= 0) & (one_minus_d <= 1)


def _probe_values(decay_fn: Callable, decay_type: str, total_steps: Any) -> None:
    last = STEP_LIMIT if total_steps is None else int(total_steps)
    steps = np.unique(np.geomspace(1, last, PROBES).round().astype(np.int64))
    steps = np.unique(np.concatenate([steps, np.arange(1, min(last, 10) + 1)])).astype(np.int32)
    with jax.ensure_compile_time_eval():  # concrete values, also when built inside a jit
        weights = jax.vmap(decay_fn)(jnp.asarray(steps))
        bad = ~np.asarray(valid_weights(weights))
    if bad.any():
        at = int(np.argmax(bad))
        d, one_minus_d = (float(np.asarray(w)[at]) for w in weights)
        raise ValueError(
            f"decay_type={decay_type!r} gives d = {d!r} (1 - d = {one_minus_d!r}) at step "
            f"{int(steps[at])}; d must be a finite number in [0, 1] at every step from 1 to "
            f"{'total_steps' if total_steps is not None else 'the end of the int32 step counter'}"
            f" ({last}), or the EMA is corrupted. Fix the schedule (e.g. clip it with "
            "jnp.clip(d, 0, 1))."
        )


def _untraceable(decay_type: str, error: Exception) -> str:
    return (
        f"decay_type={decay_type!r} cannot be traced by JAX: `step` is a traced array, so the "
        "schedule must use jax.numpy (jnp.exp, jnp.minimum, jnp.where) instead of math/numpy "
        f"functions or Python `if` on it. Original error: {type(error).__name__}: {error}"
    )


def _check_decay(decay: Any) -> None:
    if is_traced(decay) or real_inside(decay, 0.0, 1.0) is not None:
        return
    raise ValueError(
        f"decay must be a number strictly inside (0, 1); got {decay!r}{_low_precision_hint(decay)}"
    )


def _low_precision_hint(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not is_floating(dtype) or jnp.finfo(dtype).bits > 16:
        return ""
    return (
        f". A {jnp.dtype(dtype).name} decay comes from optax.inject_hyperparams, which casts "
        "hyperparameters to the params' dtype: pass hyperparam_dtype=jnp.float32 to it."
    )


def _check_total_steps(total_steps: Any) -> None:
    if total_steps is None or is_traced(total_steps):
        return
    check_number(
        total_steps,
        "total_steps",
        f"be a positive whole number of optimizer steps, at most {STEP_LIMIT} (the last step "
        "the int32 step counter reaches)",
        low=0,
        high=STEP_LIMIT,
        closed="high",
        kind="whole",
    )
