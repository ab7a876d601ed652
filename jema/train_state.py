"""A linen ``TrainState`` whose optimizer averages the params and the BatchNorm statistics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jema._state import attach_batch_stats, ema_batch_stats, ema_params, find_ema_state
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
          params: the model's params (``variables["params"]``).
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
        opt_state = tx.init(params)
        find_ema_state(opt_state)
        if batch_stats is not None:
            opt_state = attach_batch_stats(opt_state, batch_stats)
        return cls(
            step=jnp.zeros([], jnp.int32),
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            opt_state=opt_state,
            batch_stats=batch_stats,
            **kwargs,
        )

    def apply_gradients(self, *, grads: Any, batch_stats: Any = None, **kwargs: Any) -> TrainState:
        """One optimizer step; the EMA averages the new params and ``batch_stats``.

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
        if find_ema_state(self.opt_state).batch_stats is None:
            raise ValueError(
                "apply_gradients(batch_stats=...) was given but the EMA holds no batch_stats: "
                "build the state with TrainState.create(..., batch_stats=variables['batch_stats'])."
            )
        updates, opt_state = self.tx.update(
            grads, self.opt_state, self.params, batch_stats=batch_stats
        )
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            batch_stats=batch_stats,
            **kwargs,
        )

    def ema_variables(self, sigma_rel: float | None = None) -> dict[str, Any]:
        """The EMA model's variables, to evaluate with ``state.apply_fn(variables, ...)``.

        Args:
          sigma_rel: for a :func:`jema.power_ema`, the tracked width; None when it tracks one.

        Returns:
          ``{"params": ..., "batch_stats": ...}`` of the EMA (no ``"batch_stats"`` for a
          model without them), in device memory with the params' sharding (an EMA kept in
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
        variables = {"params": fill_masked(self.params, ema_params(self.opt_state, sigma_rel))}
        if self.batch_stats is not None:
            stats = ema_batch_stats(self.opt_state, sigma_rel)
            if stats is None:
                raise ValueError(
                    "the state has batch_stats but its EMA holds none: build it with "
                    "TrainState.create(..., batch_stats=variables['batch_stats'])."
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
    return state.replace(
        params=cast_like(state.params, ema["params"]),
        batch_stats=cast_like(state.batch_stats, ema.get("batch_stats")),
    )
