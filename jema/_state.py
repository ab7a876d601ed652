"""The EMA's state, finding it inside any optimizer state, reading it, attaching statistics."""

from __future__ import annotations

from typing import Any, NamedTuple, TypeAlias

import jax
import optax

from jema._power import width_key
from jema._trees import copy_floating, memory_space_of, place, pure, shared_float_dtype


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


class PowerEmaState(NamedTuple):
    """State of :func:`jema.power_ema`: one EMA per tracked width, keyed by ``repr(sigma_rel)``.

    Attributes:
      count: optimizer steps so far (the t of ``β_t = (1 - 1/t)**(γ + 1)``), not counting
        those ``skip_nonfinite`` skips.
      emas: ``{"0.05": tree, "0.1": tree}``: each width's EMA, shaped like the params.
      batch_stats: the same keys, each width's averaged BatchNorm statistics, or None until
        :func:`jema.attach_batch_stats`.
    """

    count: jax.Array  # type: ignore[assignment]  # shape=(), int32; optax's name
    emas: dict[str, Any]  # width key -> tree of the params' shapes, in the EMA dtype
    batch_stats: dict[str, Any] | None  # width key -> statistics, or None


EmaState: TypeAlias = WeightEmaState | PowerEmaState


def find_ema_state(opt_state: Any) -> EmaState:
    """The one EMA state inside ``opt_state`` (chains, MultiSteps, wrappers, nnx).

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
            "optimizer with jema.with_ema(optimizer) or chain jema.ema_transform() (or "
            "jema.power_ema()) last."
        )
    if len(found) > 1:
        paths = sorted(jax.tree_util.keystr(p) for p, _ in found)
        raise ValueError(f"{len(found)} EMA states in this optimizer state, at {paths}; keep one.")
    return pure(found[0][1])


def ema_params(opt_state: Any, sigma_rel: float | None = None) -> Any:
    """The EMA of the params held in ``opt_state``.

    Args:
      opt_state: an optimizer state containing an :func:`jema.ema_transform` or
        :func:`jema.power_ema` state.
      sigma_rel: for a power EMA, the tracked width to read; None when it tracks one.

    Returns:
      A tree shaped like the params (masked leaves stay ``optax.MaskedNode``).

    Raises:
      ValueError: when ``opt_state`` holds no EMA, or several; for ``sigma_rel``, see
        :func:`select_width`.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> jema.ema_params(jema.with_ema(optax.sgd(0.1)).init({"w": jnp.ones(2)}))["w"].tolist()
      [1.0, 1.0]
    """
    state = find_ema_state(opt_state)
    if isinstance(state, PowerEmaState):
        return state.emas[select_width(state, sigma_rel)]
    select_width(state, sigma_rel)
    return state.ema


def ema_batch_stats(opt_state: Any, sigma_rel: float | None = None) -> Any:
    """The EMA of the BatchNorm statistics, or None when none were attached.

    Args:
      opt_state: an optimizer state containing an :func:`jema.ema_transform` or
        :func:`jema.power_ema` state.
      sigma_rel: for a power EMA, the tracked width to read; None when it tracks one.

    Returns:
      The averaged statistics, or None.

    Raises:
      ValueError: when ``opt_state`` holds no EMA, or several; for ``sigma_rel``, see
        :func:`select_width`.

    Example:
      >>> import jax.numpy as jnp, optax, jema
      >>> jema.ema_batch_stats(jema.with_ema(optax.sgd(0.1)).init({"w": jnp.ones(2)})) is None
      True
    """
    state = find_ema_state(opt_state)
    key = select_width(state, sigma_rel)
    if isinstance(state, PowerEmaState):
        return None if state.batch_stats is None else state.batch_stats[key]
    return state.batch_stats


def ema_count(opt_state: Any) -> jax.Array:
    """How many optimizer steps the EMA has averaged.

    Args:
      opt_state: an optimizer state containing an :func:`jema.ema_transform` or
        :func:`jema.power_ema` state.

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


def check_attached(stats: Any, given: str, fix: str) -> None:
    """The one rule for statistics: the EMA averages them only once they were attached.

    Args:
      stats: the statistics the EMA holds, None when none were attached.
      given: what brought statistics to the EMA, for the message.
      fix: how the user attaches them, in the words of the API they use.

    Raises:
      ValueError: ``{given} but the EMA holds no batch_stats: {fix}.`` when ``stats`` is None.

    Example:
      >>> check_attached(None, "stats were given", "attach them")
      Traceback (most recent call last):
      ...
      ValueError: stats were given but the EMA holds no batch_stats: attach them.
    """
    if stats is None:
        raise ValueError(f"{given} but the EMA holds no batch_stats: {fix}.")


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
    state = find_ema_state(opt_state)
    emas = state.emas if isinstance(state, PowerEmaState) else {"": state.ema}
    wider = shared_float_dtype(list(emas.values()))
    space = memory_space_of(list(emas.values()))  # where the EMA lives (host memory, say)
    copied = {
        key: place(copy_floating(pure(batch_stats), wider, at_least=True), space) for key in emas
    }
    stats = copied if isinstance(state, PowerEmaState) else copied[""]
    return jax.tree.map(
        lambda node: node._replace(batch_stats=stats) if _is_ema_state(node) else node,
        opt_state,
        is_leaf=_is_ema_state,
    )


def tracked_sigma_rels(state: EmaState) -> tuple[float, ...]:
    """The widths a power EMA tracks, sorted; ``()`` for SuperGradients' EMA.

    Args:
      state: an EMA state (see :func:`find_ema_state`).

    Returns:
      The σ_rel values.

    Example:
      >>> import jax.numpy as jnp, jema
      >>> tracked_sigma_rels(jema.power_ema((0.1, 0.05)).init({"w": jnp.ones(2)}))
      (0.05, 0.1)
    """
    return tuple(sorted(float(k) for k in state.emas)) if isinstance(state, PowerEmaState) else ()


def select_width(state: EmaState, sigma_rel: float | None) -> str:
    """The key of the width ``sigma_rel`` asks for in ``state`` (``""`` for SG's EMA).

    Args:
      state: an EMA state.
      sigma_rel: a tracked width, or None when the state holds one EMA.

    Returns:
      The width's key in ``PowerEmaState.emas``.

    Raises:
      ValueError: ``sigma_rel`` given for SG's EMA, missing for a power EMA of several
        widths, or not tracked; the message lists the tracked widths.

    Example:
      >>> import jax.numpy as jnp, jema
      >>> select_width(jema.power_ema((0.05,)).init({"w": jnp.ones(2)}), None)
      '0.05'
    """
    if not isinstance(state, PowerEmaState):
        if sigma_rel is not None:
            raise ValueError(
                f"sigma_rel={sigma_rel!r} was given, but this optimizer state holds "
                "SuperGradients' EMA (jema.ema_transform), which has no widths; drop "
                "sigma_rel, or track widths with jema.power_ema."
            )
        return ""
    tracked = tracked_sigma_rels(state)
    listed = ", ".join(map(repr, tracked))
    if sigma_rel is None:
        if len(tracked) == 1:
            return width_key(tracked[0])
        raise ValueError(
            f"this power EMA tracks {len(tracked)} widths (sigma_rel {listed}); pass "
            "sigma_rel= one of them."
        )
    key = width_key(sigma_rel)
    if key not in state.emas:
        raise ValueError(
            f"sigma_rel={sigma_rel!r} is not tracked; tracked: {listed}. For another width, "
            "save snapshots (jema.posthoc.save_snapshot) and reconstruct it after training."
        )
    return key


def _is_ema_state(node: Any) -> bool:
    return isinstance(node, (WeightEmaState, PowerEmaState))


def _ema_states_with_paths(tree: Any) -> list[tuple[Any, EmaState]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_ema_state)
    return [(path, leaf) for path, leaf in leaves if _is_ema_state(leaf)]
