"""The EMAs of model weights as optax ``GradientTransformationExtraArgs``: SuperGradients'
(:func:`ema_transform`) and the power-function EMAs of EDM2 (:func:`power_ema`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jema._checks import check_floating_dtype
from jema._donation import keep_donations_in_their_memory
from jema._power import check_sigma_rel, power_weights, sigma_rel_to_gamma, width_key
from jema._schedules import Weights, check_every_k_steps, decay_weights_fn, valid_weights
from jema._state import EmaState, PowerEmaState, WeightEmaState, check_attached
from jema._trees import (
    all_finite,
    average_trees,
    check_memory_kind,
    check_same_structure,
    copy_floating,
    place,
)

NO_PARAMS = (
    "ema_transform requires the current value of parameters: pass them to update, "
    "tx.update(grads, opt_state, params), and to init, tx.init(params)."
)


def ema_transform(
    decay: float | Callable[[jax.Array], jax.Array] = 0.9999,
    decay_type: str = "threshold",
    *,
    total_steps: int | None = None,
    ema_dtype: Any = None,
    every_k_steps: int = 1,
    skip_nonfinite: bool = False,
    ema_memory_kind: str | None = None,
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
      decay: the (maximum) decay, strictly inside (0, 1); or any optax schedule (a function
        of the count, 0 at the first update, as optax calls learning-rate schedules), whose
        value is the ``decay`` the decay_type receives at that step: with "constant" it is
        d itself, with "threshold" it is capped by ``(1 + n) / (10 + n)``.
      decay_type: a name in :data:`jema.EMA_DECAY_FUNCTIONS` ("constant", "threshold",
        "exp", "warmup", or one you registered).
      total_steps: number of optimizer steps in training; needed by "exp" and by any
        schedule that uses it.
      ema_dtype: dtype of the averaged weights (e.g. ``jnp.float32`` for bf16 params);
        None keeps each param's dtype.
      every_k_steps: average only on every k-th optimizer step, with decay ``d ** k`` (the
        same averaging window); the work is skipped on the other steps. 1 is SG's behaviour.
      skip_nonfinite: when the new weights (or batch statistics) hold a NaN or Inf, or the
        schedule's ``d`` is NaN or outside [0, 1] at this step, keep the EMA and its count as
        they were for that step.
      ema_memory_kind: where the EMA lives: None (with the params), or "pinned_host" to keep
        every EMA leaf in host memory with the params' sharding (each host holds only its
        shards). On an averaging step the EMA comes to the device, is updated there and goes
        back (no gather); with ``every_k_steps=k`` nothing moves on the other steps.
      **decay_kwargs: options for the schedule's class, e.g. ``beta=15`` for "exp",
        ``inv_gamma``, ``power``, ``min_decay``, ``update_after_step`` for "warmup".

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: a decay outside (0, 1), an unknown decay_type, a missing or
        non-positive total_steps where the schedule needs it, a bad schedule option,
        every_k_steps not a positive int, a non-floating ema_dtype, an ema_memory_kind the
        devices do not have (the message lists theirs).
      TypeError: a schedule that cannot be traced by JAX, a non-bool skip_nonfinite.

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
    return _averaging(
        lambda count: [weights_at(count)],
        ["ema"],
        ema_dtype=ema_dtype,
        every_k_steps=k,
        skip_nonfinite=skip_nonfinite,
        ema_memory_kind=ema_memory_kind,
    )


def power_ema(
    sigma_rels: Sequence[float] = (0.05, 0.10),
    *,
    ema_dtype: Any = None,
    every_k_steps: int = 1,
    skip_nonfinite: bool = False,
    ema_memory_kind: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Power-function EMAs of several widths (EDM2), for post-hoc EMA; chained last.

    At the t-th optimizer step (1-based) each width uses ``β = (1 - 1/t)**(γ + 1)``, γ from
    :func:`jema.sigma_rel_to_gamma`: the EMA averages the weights so far with a window that
    stays a fixed fraction of training. All widths are updated in one fused pass that reads
    the params once. Save snapshots with :func:`jema.posthoc.save_snapshot` to choose another
    width after training (:func:`jema.posthoc.reconstruct`).

    Args:
      sigma_rels: the tracked widths, each in (0, 1/√12), distinct.
      ema_dtype: dtype of the averaged weights (e.g. ``jnp.float32`` for bf16 params);
        None keeps each param's dtype.
      every_k_steps: average only on every k-th step with the exact ``(1 - k/t)**(γ + 1)``;
        the work is skipped on the other steps.
      skip_nonfinite: when the new weights (or batch statistics) hold a NaN or Inf, keep the
        EMAs and the count as they were for that step.
      ema_memory_kind: where the EMA lives: None (with the params), or "pinned_host" to keep
        every EMA leaf in host memory with the params' sharding (each host holds only its
        shards). On an averaging step the EMA comes to the device, is updated there and goes
        back (no gather); with ``every_k_steps=k`` nothing moves on the other steps.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a ``PowerEmaState``.

    Raises:
      ValueError: a width outside [1e-38, 1/√12), none or repeated widths, a bad
        every_k_steps, a non-floating ema_dtype, an ema_memory_kind the devices do not have.
      TypeError: a non-bool skip_nonfinite.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> tx = optax.chain(optax.sgd(1.0), jema.power_ema((0.05, 0.10)))
      >>> params = {"w": jnp.zeros(2)}
      >>> _, state = tx.update({"w": -jnp.ones(2)}, tx.init(params), params)
      >>> jema.ema_params(state, sigma_rel=0.05)["w"].tolist()  # step 1: a copy
      [1.0, 1.0]
    """
    if isinstance(sigma_rels, (int, float)) or not sigma_rels:
        raise ValueError(f"sigma_rels must be a non-empty sequence of widths; got {sigma_rels!r}")
    widths = [check_sigma_rel(s, f"sigma_rels[{n}]") for n, s in enumerate(sigma_rels)]
    gammas = tuple(sigma_rel_to_gamma(s) for s in widths)
    keys = [width_key(s) for s in sigma_rels]
    if len(set(keys)) != len(keys):
        raise ValueError(f"sigma_rels must be distinct; got {tuple(sigma_rels)!r}")
    k = check_every_k_steps(every_k_steps)
    return _averaging(
        lambda count: power_weights(count, gammas, k),
        keys,
        ema_dtype=ema_dtype,
        every_k_steps=k,
        skip_nonfinite=skip_nonfinite,
        ema_memory_kind=ema_memory_kind,
        power=True,
    )


def _averaging(
    weights_at: Callable[[jax.Array], list[Weights]],
    keys: list[str],
    *,
    ema_dtype: Any,
    every_k_steps: int | jax.Array,
    skip_nonfinite: bool,
    ema_memory_kind: str | None,
    power: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The transform both EMAs share: init copies, update averages every EMA in one pass.

    ``weights_at(count)`` gives one ``(d, 1 - d)`` per key; SG's EMA has the one key "ema"
    (a :class:`WeightEmaState`), a power EMA one per width (a :class:`PowerEmaState`).
    """
    ema_dtype = _check_ema_dtype(ema_dtype)
    space = check_memory_kind(ema_memory_kind)
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be True or False; got {skip_nonfinite!r}")
    k = every_k_steps

    def pack(count: jax.Array, emas: list[Any], stats: list[Any] | None) -> EmaState:
        if power:
            by_key = None if stats is None else dict(zip(keys, stats, strict=True))
            return PowerEmaState(count, dict(zip(keys, emas, strict=True)), by_key)
        return WeightEmaState(count, emas[0], None if stats is None else stats[0])

    def unpack(state: EmaState) -> tuple[list[Any], list[Any] | None]:
        if isinstance(state, PowerEmaState):
            stats = state.batch_stats
            return [state.emas[key] for key in keys], (
                None if stats is None else [stats[key] for key in keys]
            )
        return [state.ema], None if state.batch_stats is None else [state.batch_stats]

    def init_fn(params: optax.Params) -> EmaState:
        if params is None:
            raise ValueError(NO_PARAMS)
        emas = [place(copy_floating(params, ema_dtype), space) for _ in keys]
        return pack(jnp.zeros([], jnp.int32), emas, None)

    def update_fn(
        updates: optax.Updates,
        state: EmaState,
        params: optax.Params | None = None,
        *,
        batch_stats: Any = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, EmaState]:
        del extra_args
        if params is None:
            raise ValueError(NO_PARAMS)
        emas, stats = unpack(state)
        check_same_structure(emas[0], params, "params")
        if batch_stats is not None:
            given = "update(..., batch_stats=...) was given"
            fix = "call jema.attach_batch_stats(opt_state, batch_stats) once after tx.init(params)"
            check_attached(stats, given, fix)
            assert stats is not None  # for mypy: check_attached refused None
            check_same_structure(stats[0], batch_stats, "batch_stats")
        count = optax.safe_increment(state.count)
        weights = weights_at(count)
        # k injected at run time (traced): below 1 it would freeze or corrupt the EMA, and
        # nothing can raise under jit, so the step averages with NaN weights instead
        bad_k = None if isinstance(k, int) else k < 1
        if bad_k is not None:
            weights = [
                (jnp.where(bad_k, jnp.nan, d), jnp.where(bad_k, jnp.nan, m)) for d, m in weights
            ]

        def average(_: None) -> tuple[list[Any], list[Any] | None]:
            here = jax.memory.Space.Device if space is not None else None
            new = optax.apply_updates(params, updates)
            new_emas = place(average_trees(place(emas, here), new, weights), space)
            if batch_stats is None or stats is None:
                return new_emas, stats
            return new_emas, place(average_trees(place(stats, here), batch_stats, weights), space)

        if isinstance(k, int) and k == 1 and not skip_nonfinite:
            new_emas, new_stats = average(None)
        else:
            due = count % k == 0
            if skip_nonfinite:
                finite = all_finite(optax.apply_updates(params, updates), batch_stats)
                for pair in weights:
                    finite = jnp.logical_and(finite, valid_weights(pair))
                due = jnp.logical_and(due, finite)
                count = jnp.where(finite, count, state.count)
            if bad_k is not None:
                due = jnp.logical_or(due, bad_k)
            new_emas, new_stats = jax.lax.cond(due, average, lambda _: (emas, stats), None)
        out = updates, pack(count, new_emas, new_stats)
        # kept alive by whatever the caller uses, even with the new state thrown away
        return out if space is None else keep_donations_in_their_memory(out)

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
    return check_floating_dtype(ema_dtype, "ema_dtype", "jnp.float32")
