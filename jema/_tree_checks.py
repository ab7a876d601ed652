"""Checks on trees before they are averaged: same paths as the EMA's, all values finite."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jema._average import is_none


def check_same_structure(attached: Any, given: Any, name: str) -> None:
    """Check that ``given`` can be averaged into ``attached`` (the EMA's copy of ``name``).

    Paths and shapes must match exactly: a broadcastable shape would silently change the
    EMA's shape.

    Args:
      attached: what the EMA holds for ``name``, or None when nothing was attached.
      given: the new values passed to ``update``.
      name: the keyword they came in, for the message.

    Raises:
      ValueError: when nothing was attached, or the two trees differ in paths or shapes
        (every difference listed, sorted).

    Example:
      >>> import jax.numpy as jnp
      >>> check_same_structure({"mean": jnp.zeros(2)}, {"mean": jnp.ones(2)}, "batch_stats")
    """
    if attached is None:
        raise ValueError(
            f"update(..., {name}=...) was given but the EMA holds no {name}: call "
            f"jema.attach_batch_stats(opt_state, {name}) once after tx.init(params)."
        )
    if jax.tree.structure(attached, is_leaf=is_none) != jax.tree.structure(given, is_leaf=is_none):
        raise ValueError(
            f"the {name} given to update have a different structure from the EMA's: "
            f"{_structure_diff(attached, given)}"
        )
    shapes = sorted(
        f"{jax.tree_util.keystr(path)}: EMA {jnp.shape(a)}, given {jnp.shape(g)}"
        for (path, a), g in zip(
            jax.tree_util.tree_leaves_with_path(attached, is_leaf=is_none),
            jax.tree.leaves(given, is_leaf=is_none),
            strict=True,
        )
        if a is not None and jnp.shape(a) != jnp.shape(g)
    )
    if shapes:
        raise ValueError(f"the {name} given to update differ in shape from the EMA's: {shapes}")


def all_finite(*trees: Any) -> jax.Array:
    """True when no floating leaf of ``trees`` holds a NaN or an Inf.

    Args:
      *trees: pytrees (None leaves and non-floating leaves are ignored).

    Returns:
      A boolean scalar array.

    Example:
      >>> import jax.numpy as jnp
      >>> bool(all_finite({"w": jnp.ones(2)}, {"w": jnp.array([1.0, jnp.inf])}))
      False
    """
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(trees)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _paths(tree: Any) -> set[str]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_none)
    return {jax.tree_util.keystr(path) for path, _ in leaves}


def _structure_diff(expected: Any, got: Any) -> str:
    missing = sorted(_paths(expected) - _paths(got))
    unexpected = sorted(_paths(got) - _paths(expected))
    if not missing and not unexpected:
        return "same paths, different container types"
    return f"missing {missing[:10]}, unexpected {unexpected[:10]}"
