"""Building the EMA model's weights from the optimizer's EMA: masked leaves, raw dtypes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def fill_masked(raw: Any, ema: Any) -> Any:
    """``ema`` with its masked leaves (``optax.MaskedNode``) taken from ``raw``.

    Args:
      raw: the raw model's tree.
      ema: the EMA's tree, same structure up to masked leaves.

    Returns:
      A tree shaped like ``ema`` with no ``MaskedNode`` leaves.

    Example:
      >>> import optax, jax.numpy as jnp
      >>> fill_masked({"a": 1, "b": 2}, {"a": optax.MaskedNode(), "b": 5})
      {'a': 1, 'b': 5}
    """
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return jax.tree.map(lambda e, r: r if is_masked(e) else e, ema, raw, is_leaf=is_masked)


def cast_like(raw: Any, ema: Any) -> Any:
    """``ema`` (masked leaves filled from ``raw``) cast to the dtypes of ``raw``'s leaves.

    Args:
      raw: the raw model's tree, or None.
      ema: the EMA's tree, same structure, or None when ``raw`` is.

    Returns:
      New arrays (never the EMA's buffers) shaped and typed like ``raw``.

    Example:
      >>> import jax.numpy as jnp
      >>> cast_like({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.full(2, 0.5)})["w"].dtype
      dtype(bfloat16)
    """
    if raw is None:
        return None
    return jax.tree.map(
        lambda e, r: jnp.array(e, dtype=jnp.asarray(r).dtype, copy=True), fill_masked(raw, ema), raw
    )
