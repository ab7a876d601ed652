"""Tree helpers: averaging, the EMA's dtype policy, checks before averaging, the final swap."""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jema._checks import is_floating
from jema._donation import keep_donations_in_their_memory


def is_none(x: Any) -> bool:
    """The ``is_leaf`` that keeps ``None`` leaves in tree maps (as optax's masked leaves need).

    Args:
      x: a tree node.

    Returns:
      True for ``None``.

    Example:
      >>> is_none(None), is_none(0.0)
      (True, False)
    """
    return x is None


def pure(tree: Any) -> Any:
    """``tree`` with flax nnx Variables unwrapped to their values; flax is never imported here.

    An nnx Variable can only exist once ``flax.nnx`` is imported, so without it the tree is
    returned as is.

    Args:
      tree: any pytree, possibly holding ``nnx.Variable`` leaves.

    Returns:
      The same tree with plain arrays where the Variables were.

    Example:
      >>> pure({"w": 1.0})
      {'w': 1.0}
    """
    nnx = sys.modules.get("flax.nnx")
    return tree if nnx is None else nnx.as_pure(tree)


MEMORY_SPACES = {"device": jax.memory.Space.Device, "pinned_host": jax.memory.Space.Host}


def check_memory_kind(kind: str | None) -> Any:
    """The ``jax.memory.Space`` an EMA kept in memory ``kind`` lives in, or None for default.

    Args:
      kind: None, "device" or "pinned_host"; it must be one the devices list in
        ``addressable_memories()``.

    Returns:
      ``jax.memory.Space.Device``, ``jax.memory.Space.Host``, or None.

    Raises:
      ValueError: for another kind, naming it and the kinds the devices have.

    Example:
      >>> check_memory_kind("pinned_host") == jax.memory.Space.Host
      True
    """
    if kind is None:
        return None
    listed = sorted({m.kind for m in jax.devices()[0].addressable_memories()})
    usable = [k for k in listed if k in MEMORY_SPACES]
    if kind not in usable:
        raise ValueError(
            f"ema_memory_kind must be one of {usable} (the devices list {listed}; jema moves "
            f"the EMA between device and pinned host memory); got {kind!r}"
        )
    return MEMORY_SPACES[kind]


def place(tree: Any, space: Any) -> Any:
    """``tree`` with every array leaf in memory ``space``, keeping its sharding.

    Leaves already there are returned as they are (no copy); works on traced leaves too, and
    then keeps the traced program's donations each in its own memory kind.

    Args:
      tree: a pytree of jax arrays (None leaves stay None).
      space: a ``jax.memory.Space``, or None to leave the tree as it is.

    Returns:
      The tree in ``space``.

    Example:
      >>> place({"w": jnp.ones(2)}, jax.memory.Space.Host)["w"].sharding.memory_kind
      'pinned_host'
    """
    if space is None:
        return tree

    def move(x: Any) -> Any:
        if x is None or jax.typeof(x).memory_space == space:
            return x
        return jax.device_put(x, space)

    return keep_donations_in_their_memory(jax.tree.map(move, tree, is_leaf=is_none))


def memory_space_of(tree: Any) -> Any:
    """The memory space of ``tree``'s first array leaf, or None for an empty tree.

    Args:
      tree: a pytree of jax arrays.

    Returns:
      A ``jax.memory.Space``, or None.

    Example:
      >>> memory_space_of({"w": jnp.ones(2)}) == jax.memory.Space.Device
      True
    """
    leaves = jax.tree.leaves(tree)
    return jax.typeof(leaves[0]).memory_space if leaves else None


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype the EMA's arithmetic runs in: ``dtype`` promoted to at least float32.

    Args:
      dtype: a floating dtype.

    Returns:
      float32 for 8-, 16- and 32-bit floats (jax promotes no float8 implicitly), ``dtype``
      for wider ones.

    Example:
      >>> compute_dtype(jnp.bfloat16), compute_dtype(jnp.float8_e4m3fn)
      (dtype('float32'), dtype('float32'))
    """
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits > 32 else jnp.dtype(jnp.float32)


def copy_floating(tree: Any, dtype: Any = None, *, at_least: bool = False) -> Any:
    """A copy of ``tree`` (never its buffers) with floating leaves in ``dtype``.

    Args:
      tree: a pytree of arrays; ``None`` leaves stay ``None``.
      dtype: the floating dtype, or None to keep each leaf's dtype.
      at_least: promote floating leaves to ``dtype`` instead of casting them to it (never
        narrows, e.g. float32 statistics stay float32 beside a bfloat16 EMA).

    Returns:
      The copy; non-floating leaves keep their dtype.

    Example:
      >>> copy_floating({"w": jnp.ones(2, jnp.bfloat16)}, jnp.float32)["w"].dtype
      dtype('float32')
    """

    def copy(x: Any) -> Any:
        if x is None:
            return None
        x = jnp.asarray(x)
        target = None
        if dtype is not None and is_floating(x.dtype):
            target = _wider(x.dtype, dtype) if at_least else dtype
        return jnp.array(x, dtype=target, copy=True)

    return jax.tree.map(copy, tree, is_leaf=is_none)


def _wider(a: Any, b: Any) -> jnp.dtype:
    """jax's promotion of two floating dtypes, and for a float8 (which jax promotes with
    nothing) the one with more bits."""
    bits_a, bits_b = jnp.finfo(a).bits, jnp.finfo(b).bits
    if 8 in (bits_a, bits_b):
        return jnp.dtype(a if bits_a > bits_b else b)
    return jnp.promote_types(a, b)


def shared_float_dtype(tree: Any) -> jnp.dtype | None:
    """The one floating dtype of ``tree``'s leaves, or None when there is none or several.

    Args:
      tree: a pytree of arrays.

    Returns:
      A dtype, or None.

    Example:
      >>> shared_float_dtype({"w": jnp.ones(2), "n": jnp.ones(2, jnp.int32)})
      dtype('float32')
    """
    dtypes = {jnp.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree) if is_floating(leaf.dtype)}
    return dtypes.pop() if len(dtypes) == 1 else None


def average_tree(ema: Any, new: Any, weights: tuple[jax.Array, jax.Array]) -> Any:
    """``ema * d + (1 - d) * new`` on every floating leaf; other leaves keep ``ema``.

    The arithmetic runs in :func:`compute_dtype` of the EMA leaf, so a bfloat16 EMA never
    sees a decay rounded to bfloat16.

    Args:
      ema: the running average.
      new: the newest values, same structure as ``ema``.
      weights: ``(d, 1 - d)``, float scalars.

    Returns:
      The new average, same structure and dtypes as ``ema``.

    Example:
      >>> average_tree({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, (0.75, 0.25))["w"].tolist()
      [0.25, 0.25]
    """
    return average_trees([ema], new, [weights])[0]


def average_trees(emas: list[Any], new: Any, weights: list[tuple[Any, Any]]) -> list[Any]:
    """:func:`average_tree` of several EMAs of the same values, in one pass over ``new``.

    Each leaf of ``new`` is mixed into every EMA in one map, which lets XLA fuse the widths into
    one loop (one read of the params, one read and write per EMA); XLA:CPU still emits a loop
    per EMA (see the README's post-hoc benchmark).

    Args:
      emas: the running averages, each with the structure of ``new``.
      new: the newest values.
      weights: one ``(d, 1 - d)`` pair per EMA.

    Returns:
      The new averages, in the order of ``emas``.

    Example:
      >>> out = average_trees([jnp.zeros(1), jnp.ones(1)], jnp.full(1, 2.0), [(0.5, 0.5)] * 2)
      >>> [o.tolist() for o in out]
      [[1.0], [1.5]]
    """
    if not emas:
        return []
    treedef: Any = jax.tree.structure(emas[0], is_leaf=is_none)
    news = treedef.flatten_up_to(new)
    columns = [treedef.flatten_up_to(ema) for ema in emas]
    mixed: list[list[Any]] = [[] for _ in emas]
    for i, n in enumerate(news):
        for out, column, w in zip(mixed, columns, weights, strict=True):
            out.append(_mix(column[i], n, w))
    return [treedef.unflatten(leaves) for leaves in mixed]


def _mix(e: Any, n: Any, weights: tuple[Any, Any]) -> Any:
    if e is None or not is_floating(e.dtype):
        return e
    compute = compute_dtype(e.dtype)
    d, one_minus_d = (jnp.asarray(w, compute) for w in weights)
    return (e.astype(compute) * d + one_minus_d * jnp.asarray(n).astype(compute)).astype(e.dtype)


def check_same_structure(attached: Any, given: Any, name: str) -> None:
    """Check that ``given`` can be averaged into ``attached`` (the EMA's copy of ``name``).

    Paths and shapes must match exactly: a broadcastable shape would silently change the
    EMA's shape.

    Args:
      attached: what the EMA holds for ``name``.
      given: the new values passed to ``update``.
      name: the keyword they came in, for the message.

    Raises:
      ValueError: when the two trees differ in paths or shapes (every difference listed,
        sorted).

    Example:
      >>> check_same_structure({"m": jnp.zeros(2)}, {"m": jnp.ones(2)}, "batch_stats")
    """
    if not _same_structure(attached, given):
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
      >>> bool(all_finite({"w": jnp.ones(2)}, {"w": jnp.array([1.0, jnp.inf])}))
      False
    """
    checks = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(trees)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def fill_masked(raw: Any, ema: Any) -> Any:
    """``ema`` with its masked leaves (``optax.MaskedNode``) taken from ``raw``.

    Args:
      raw: the raw model's tree.
      ema: the EMA's tree, same structure up to masked leaves.

    Returns:
      A tree shaped like ``ema`` with no ``MaskedNode`` leaves.

    Example:
      >>> fill_masked({"a": 1, "b": 2}, {"a": optax.MaskedNode(), "b": 5})
      {'a': 1, 'b': 5}
    """
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return jax.tree.map(lambda e, r: r if is_masked(e) else e, ema, raw, is_leaf=is_masked)


def cast_like(raw: Any, ema: Any) -> Any:
    """``ema`` (masked leaves filled from ``raw``) on the device, cast to ``raw``'s dtypes.

    An EMA kept in host memory comes to the device memory of its sharding (one transfer).

    Args:
      raw: the raw model's tree, or None.
      ema: the EMA's tree, same structure, or None when ``raw`` is.

    Returns:
      New arrays (never the EMA's buffers) shaped and typed like ``raw``.

    Example:
      >>> cast_like({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.full(2, 0.5)})["w"].dtype
      dtype(bfloat16)
    """
    if raw is None:
        return None
    on_device = place(fill_masked(raw, ema), jax.memory.Space.Device)
    return jax.tree.map(
        lambda e, r: jnp.array(e, dtype=jnp.asarray(r).dtype, copy=True), on_device, raw
    )


def _same_structure(a: Any, b: Any) -> bool:
    structures: list[Any] = [jax.tree.structure(t, is_leaf=is_none) for t in (a, b)]
    return bool(structures[0] == structures[1])


def _paths(tree: Any) -> set[str]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_none)
    return {jax.tree_util.keystr(path) for path, _ in leaves}


def _structure_diff(expected: Any, got: Any) -> str:
    missing = sorted(_paths(expected) - _paths(got))
    unexpected = sorted(_paths(got) - _paths(expected))
    if not missing and not unexpected:
        return "same paths, different container types"
    return f"missing {missing[:10]}, unexpected {unexpected[:10]}"
