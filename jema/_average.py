"""Averaging trees of weights: ``ema * d + (1 - d) * new`` leaf by leaf, SG's formula."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def is_none(x: Any) -> bool:
    """The ``is_leaf`` that keeps ``None`` leaves in tree maps (as optax's masked leaves need).

    Example:
      >>> is_none(None), is_none(0.0)
      (True, False)
    """
    return x is None


def average_tree(ema: Any, new: Any, weights: tuple[jax.Array, jax.Array]) -> Any:
    """``ema * d + (1 - d) * new`` on every floating leaf; other leaves keep ``ema``.

    The arithmetic runs in the EMA leaf's dtype promoted to at least float32, so a bfloat16
    EMA never sees a decay rounded to bfloat16.

    Args:
      ema: the running average.
      new: the newest values, same structure as ``ema``.
      weights: ``(d, 1 - d)``, float scalars.

    Returns:
      The new average, same structure and dtypes as ``ema``.

    Example:
      >>> import jax.numpy as jnp
      >>> average_tree({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, (0.75, 0.25))["w"].tolist()
      [0.25, 0.25]
    """
    return jax.tree.map(lambda e, n: _average_leaf(e, n, weights), ema, new, is_leaf=is_none)


def _average_leaf(ema: Any, new: Any, weights: tuple[jax.Array, jax.Array]) -> Any:
    if ema is None or not jnp.issubdtype(ema.dtype, jnp.floating):
        return ema
    compute = jnp.promote_types(ema.dtype, jnp.float32)
    d, one_minus_d = (jnp.asarray(w, compute) for w in weights)
    mixed = ema.astype(compute) * d + one_minus_d * jnp.asarray(new).astype(compute)
    return mixed.astype(ema.dtype)
