"""A linen ``TrainState`` whose optimizer averages the params and the BatchNorm statistics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

from jema._state import (
    attach_batch_stats,
    check_attached,
    ema_batch_stats,
    ema_params,
    find_ema_state,
)
from jema._trees import cast_like, fill_masked, place


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` with ``batch_stats`` averaged by the EMA.

    Build it with :meth:`create` and an optimizer from :func:`jema.with_ema`; the EMA
    starts as an exact copy of ``params`` and ``batch_stats`` and each
    :meth:`apply_gradients` averages the new weights and the new statistics.

    Attributes:
      batch_stats: the raw model's BatchNorm statistics, or None for a model without them.
    """

    batch_stats: Any = None

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Any,
        params: Any,
        tx: optax.GradientTransformation,
        batch_stats: Any = None,
        **kwargs: Any,
    ) -> TrainState:
        """A state at step 0 whose EMA holds copies of ``params`` and ``batch_stats``.

        ``step`` starts as an int32 array (flax uses the Python int 0), so a jitted train
        step compiles once, not once for the int and again for the array it returns.

        Args:
          apply_fn: usually ``model.apply``.
          params: the model's params (``variables["params"]``), or flax's fp8 variables
            ``{"params": ..., OVERWRITE_WITH_GRADIENT: ...}``, whose second part the
            optimizer and the EMA never see (as in flax's ``TrainState``).
          tx: an optimizer holding one EMA, e.g. ``jema.with_ema(optax.adam(1e-3))``.
          batch_stats: ``variables["batch_stats"]``, or None for a model without BatchNorm.
          **kwargs: other fields of a subclass.

        Returns:
          The new state.

        Raises:
          ValueError: when ``tx`` holds no EMA, or several.

        Example:
          >>> import jax.numpy as jnp, optax, jema
          >>> from jema.train_state import TrainState
          >>> state = TrainState.create(apply_fn=None, params={"w": jnp.ones(2)},
          ...                           tx=jema.with_ema(optax.sgd(0.1)))
          >>> int(jema.ema_count(state.opt_state))
          0
        """
        state = super().create(
            apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats, **kwargs
        )
        find_ema_state(state.opt_state)
        opt_state = state.opt_state
        if batch_stats is not None:
            opt_state = attach_batch_stats(opt_state, batch_stats)
        return state.replace(step=jnp.zeros([], jnp.int32), opt_state=opt_state)

    def apply_gradients(self, *, grads: Any, batch_stats: Any = None, **kwargs: Any) -> TrainState:
        """One optimizer step (flax's, fp8 ``OVERWRITE_WITH_GRADIENT`` params included); the
        EMA averages the new params and ``batch_stats``.

        Args:
          grads: gradients shaped like ``params``.
          batch_stats: the statistics after this step's forward pass (the ``mutable``
            output of ``apply_fn``); None keeps the stored ones and the EMA's unchanged.
          **kwargs: other fields to replace.

        Returns:
          The state with ``step + 1``, new params, optimizer state and ``batch_stats``.

        Raises:
          ValueError: ``batch_stats`` given to a state created without them, or shaped
            differently from them.

        Example:
          >>> import jax.numpy as jnp, optax, jema
          >>> from jema.train_state import TrainState
          >>> tx = jema.with_ema(optax.sgd(1.0), decay=0.5, decay_type="constant")
          >>> state = TrainState.create(apply_fn=None, params={"w": jnp.zeros(1)}, tx=tx)
          >>> state = state.apply_gradients(grads={"w": -jnp.ones(1)})
          >>> jema.ema_params(state.opt_state)["w"].tolist()
          [0.5]
        """
        if batch_stats is None:
            return super().apply_gradients(grads=grads, **kwargs)
        check_attached(
            find_ema_state(self.opt_state).batch_stats,
            "apply_gradients(batch_stats=...) was given",
            "build the state with TrainState.create(..., batch_stats=variables['batch_stats'])",
        )
        averaging = self.replace(tx=_passing_batch_stats(self.tx, batch_stats))
        stepped = super(TrainState, averaging).apply_gradients(
            grads=grads, batch_stats=batch_stats, **kwargs
        )
        return stepped.replace(tx=self.tx)

    def ema_variables(self, sigma_rel: float | None = None) -> dict[str, Any]:
        """The EMA model's variables, to evaluate with ``state.apply_fn(variables, ...)``.

        Args:
          sigma_rel: for a :func:`jema.power_ema`, the tracked width; None when it tracks one.

        Returns:
          ``{"params": ..., "batch_stats": ...}`` of the EMA (no ``"batch_stats"`` for a
          model without them; fp8 ``OVERWRITE_WITH_GRADIENT`` params, which flax's optimizer
          never sees, are the raw ones), in device memory with the params' sharding (an EMA kept in
          host memory is brought over); leaves the EMA does not hold (masked) come from the
          raw model.

        Raises:
          ValueError: when the optimizer state holds no EMA, several, or no statistics
            while the state has some.

        Example:
          >>> import jax.numpy as jnp, optax, jema
          >>> from jema.train_state import TrainState
          >>> state = TrainState.create(apply_fn=None, params={"w": jnp.ones(2)},
          ...                           tx=jema.with_ema(optax.sgd(0.1)))
          >>> state.ema_variables()["params"]["w"].tolist()
          [1.0, 1.0]
        """
        averaged, overwritten = _split(self.params)
        params = _join(fill_masked(averaged, ema_params(self.opt_state, sigma_rel)), overwritten)
        variables = {"params": params}
        if self.batch_stats is not None:
            stats = ema_batch_stats(self.opt_state, sigma_rel)
            check_attached(
                stats,
                "the state has batch_stats",
                "build it with TrainState.create(..., batch_stats=variables['batch_stats'])",
            )
            variables["batch_stats"] = stats
        return place(variables, jax.memory.Space.Device)  # an EMA in host memory comes over


def finalize(state: TrainState, sigma_rel: float | None = None) -> TrainState:
    """SuperGradients' end-of-training swap: the weights become the EMA's.

    Args:
      state: a :class:`TrainState` built with an EMA optimizer.
      sigma_rel: for a :func:`jema.power_ema`, the tracked width; None when it tracks one.

    Returns:
      ``state`` with ``params`` and ``batch_stats`` replaced by the EMA's, cast to the raw
      leaves' dtypes; the optimizer state (EMA included) is kept.

    Raises:
      TypeError: when ``state`` is not a :class:`TrainState`.
      ValueError: as :meth:`TrainState.ema_variables`.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> from jema.train_state import TrainState, finalize
      >>> tx = jema.with_ema(optax.sgd(1.0), decay=0.5, decay_type="constant")
      >>> state = TrainState.create(apply_fn=None, params={"w": jnp.zeros(1)}, tx=tx)
      >>> finalize(state.apply_gradients(grads={"w": -jnp.ones(1)})).params["w"].tolist()
      [0.5]
    """
    if not isinstance(state, TrainState):
        raise TypeError(
            f"finalize expects a jema TrainState; got {type(state).__name__}. For nnx use "
            "jema.nnx.finalize(optimizer, model)."
        )
    ema = state.ema_variables(sigma_rel)
    averaged, overwritten = _split(state.params)
    return state.replace(
        params=_join(cast_like(averaged, _split(ema["params"])[0]), overwritten),
        batch_stats=cast_like(state.batch_stats, ema.get("batch_stats")),
    )


def _passing_batch_stats(tx: optax.GradientTransformation, batch_stats: Any) -> Any:
    """``tx`` whose update is given ``batch_stats``, for flax's ``apply_gradients`` to call."""

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return tx.update(updates, state, params, batch_stats=batch_stats, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def _split(params: Any) -> tuple[Any, Any]:
    """The params the optimizer sees, and flax's fp8 ``OVERWRITE_WITH_GRADIENT`` ones (None
    when there are none), split as flax's ``TrainState`` splits them."""
    if isinstance(params, Mapping) and OVERWRITE_WITH_GRADIENT in params:
        return params["params"], params[OVERWRITE_WITH_GRADIENT]
    return params, None


def _join(averaged: Any, overwritten: Any) -> Any:
    if overwritten is None:
        return averaged
    return {"params": averaged, OVERWRITE_WITH_GRADIENT: overwritten}
