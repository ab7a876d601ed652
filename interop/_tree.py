"""Flax variables (linen dicts, nnx models and states, named groups) as flat leaves and back."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, cast

import jax
from flax import nnx, traverse_util

from interop._names import Path, without_sequential_lists


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One array of a Flax structure.

    Attributes:
      path: its key path in the structure, e.g. ``("params", "conv1", "kernel")``.
      module: its module path without collections, e.g. ``("conv1",)``.
      value: an array, or a ``jax.ShapeDtypeStruct`` in an abstract template.
    """

    path: Path
    module: Path
    value: Any

    @property
    def name(self) -> str:
        return str(self.path[-1])

    @property
    def label(self) -> str:
        return "/".join(str(p) for p in self.path)


@dataclasses.dataclass(frozen=True)
class Flat:
    """Leaves in the structure's order, how to rebuild it, whether that order is linen's, and
    whether it is sorted: every dict level in sorted key order, as ``jax.eval_shape`` and
    ``jax.jit`` return dicts (an eager linen ``init`` gives ``kernel`` before ``bias``); a group is
    sorted when one of its parts is."""

    leaves: list[Leaf]
    rebuild: Callable[[list[Any]], Any]
    ordered: bool
    sorted: bool = False


def flatten(variables: Any) -> Flat:
    """Flattens linen variables, an nnx model or state, or a mapping of named such parts.

    A mapping without ``"params"`` whose values are all variables (e.g.
    ``{"student": ..., "teacher": ...}``) is a group: each name becomes a module prefix.

    Args:
      variables: linen variables (``{"params": ..., "batch_stats": ...}``), an nnx Module or
        State (its ``Param`` and ``BatchStat`` leaves), or a mapping of names to those.

    Returns:
      A ``Flat``: the leaves in order, ``rebuild(values)`` giving the same structure holding
      new values, whether the order is linen's first-call order, and whether it is sorted.

    Raises:
      TypeError: naming the type when the input is none of these, or saying it is empty when it
        is a mapping holding no arrays (``{}``).

    Example:
      >>> import numpy as np
      >>> flat = flatten({"params": {"fc": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}}})
      >>> [leaf.label for leaf in flat.leaves], flat.ordered, flat.sorted
      (['params/fc/kernel', 'params/fc/bias'], True, False)
      >>> flat.rebuild([1, 2])
      {'params': {'fc': {'kernel': 1, 'bias': 2}}}
    """
    if isinstance(variables, nnx.Module):
        return _flatten_nnx(
            nnx.state(variables, (nnx.Param, nnx.BatchStat)), _sequentials(variables)
        )
    if isinstance(variables, nnx.State):
        return _flatten_nnx(variables, frozenset())
    if isinstance(variables, Mapping) and "params" in variables:
        return _flatten_linen(variables)
    if isinstance(variables, Mapping) and variables and all(map(_is_variables, variables.values())):
        return _flatten_group(variables)
    if isinstance(variables, Mapping) and not jax.tree.leaves(variables):
        raise TypeError(
            f"the Flax template (or variables) is empty, it holds no arrays: got {variables!r}. "
            "Pass linen variables {'params': ..., 'batch_stats': ...} (model.init(key, x), or "
            "jax.eval_shape(model.init, key, x) for shapes only), an nnx Module or State, or a "
            "mapping of names to those"
        )
    raise TypeError(
        f"expected linen variables {{'params': ..., 'batch_stats': ...}}, an nnx Module or "
        f"State, or a mapping of names to those; got {type(variables).__name__}"
    )


def _is_variables(x: Any) -> bool:
    return isinstance(x, nnx.Module | nnx.State) or (isinstance(x, Mapping) and "params" in x)


def _flatten_linen(variables: Mapping) -> Flat:
    # flatten_dict keeps linen's first-call order; jax.tree_util would sort the keys.
    items = traverse_util.flatten_dict(variables)
    leaves = [Leaf(path, path[1:-1], value) for path, value in items.items()]
    paths = list(items)
    # Depth-first paths are in sorted order exactly when every dict's keys are.
    named = [tuple(map(str, path)) for path in paths]
    return Flat(
        leaves,
        lambda values: traverse_util.unflatten_dict(dict(zip(paths, values, strict=True))),
        True,
        len(named) > 1 and named == sorted(named),
    )


def _sequentials(module: nnx.Module) -> frozenset[Path]:
    """The paths of the ``nnx.Sequential`` modules in ``module``, the root being ``()``."""
    return frozenset(
        cast(Path, tuple(path))
        for path, node in nnx.iter_graph(module)
        if isinstance(node, nnx.Sequential)
    )


def _flatten_nnx(state: nnx.State, sequentials: frozenset[Path]) -> Flat:
    state = nnx.filter_state(state, (nnx.Param, nnx.BatchStat))
    items, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = []
    for keys, value in items:
        path = tuple(_part(k) for k in keys if not isinstance(k, jax.tree_util.GetAttrKey))
        module = without_sequential_lists(path, sequentials.__contains__)[:-1]
        leaves.append(Leaf(path, module, value))
    return Flat(leaves, lambda values: jax.tree_util.tree_unflatten(treedef, values), False)


def _part(key: Any) -> str | int:
    return key.idx if isinstance(key, jax.tree_util.SequenceKey) else key.key


def _flatten_group(group: Mapping) -> Flat:
    parts = {name: flatten(v) for name, v in group.items()}
    leaves = [
        Leaf((name, *leaf.path), (name, *leaf.module), leaf.value)
        for name, flat in parts.items()
        for leaf in flat.leaves
    ]
    sizes = [len(flat.leaves) for flat in parts.values()]

    def rebuild(values: list[Any]) -> dict:
        out, start = {}, 0
        for (name, flat), size in zip(parts.items(), sizes, strict=True):
            out[name] = flat.rebuild(values[start : start + size])
            start += size
        return out

    ordered = all(flat.ordered for flat in parts.values())
    return Flat(leaves, rebuild, ordered, any(flat.sorted for flat in parts.values()))
