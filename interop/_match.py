"""Pairing Flax leaves with PyTorch keys: by name, then rename rules, then (opt-in) by order.

Both directions pair through ``pair``, so a name found loading is the name written saving."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from interop._layouts import MODULES, Layout, for_leaf, is_torch_only
from interop._names import (
    Path,
    Rename,
    apply_rename,
    compile_rename,
    dotted,
    normalise,
    without_sequential_lists,
)
from interop._tree import Leaf


@dataclasses.dataclass(frozen=True)
class Unit:
    """Flax leaves converted together, with their default PyTorch names (same order as layout)
    and those of the PyTorch-only buffers that go with them."""

    layout: Layout
    leaves: tuple[Leaf, ...]
    names: tuple[str, ...]
    torch_only: tuple[str, ...]


def units(leaves: Sequence[Leaf]) -> list[Unit]:
    """Groups leaves by module into layout units, in module order (linen: first-call order).

    Within a module, leaves keep their order, so a BatchNorm reads scale, bias, mean, var:
    PyTorch's weight, bias, running_mean, running_var. An attention module's leaves form one
    unit.

    Args:
      leaves: the leaves of ``flatten(variables)``.

    Returns:
      One ``Unit`` per layout entry found, each with its default PyTorch names.

    Example:
      >>> import numpy as np
      >>> from interop._tree import flatten
      >>> leaves = flatten({"params": {"fc": {"kernel": np.zeros((2, 3))}}}).leaves
      >>> [unit.names for unit in units(leaves)]
      [('fc.weight',)]
    """
    by_module: dict[Path, list[Leaf]] = {}
    for leaf in leaves:
        by_module.setdefault(leaf.module, []).append(leaf)
    ordered = [leaf for group in by_module.values() for leaf in group]
    position = {id(leaf): i for i, leaf in enumerate(ordered)}
    taken: dict[int, Unit | None] = {}
    for parent in dict.fromkeys(m[:-1] for m in by_module if m):
        for layout in MODULES:
            found = _module_leaves(layout, parent, by_module)
            if found is not None:
                first = min(found, key=lambda leaf: position[id(leaf)])
                module_unit = _unit(layout, parent, found)
                taken.update({id(leaf): module_unit if leaf is first else None for leaf in found})
    out = []
    for leaf in ordered:
        if id(leaf) not in taken:
            out.append(_unit(for_leaf(leaf.name), leaf.module, (leaf,)))
        elif (unit := taken[id(leaf)]) is not None:
            out.append(unit)
    return out


def _unit(layout: Layout, module: Path, leaves: tuple[Leaf, ...]) -> Unit:
    names = tuple(dotted((*module, t)) for t in layout.torch)
    return Unit(layout, leaves, names, tuple(dotted((*module, t)) for t, _ in layout.torch_only))


def _module_leaves(
    layout: Layout, parent: Path, by_module: dict[Path, list[Leaf]]
) -> tuple[Leaf, ...] | None:
    found = []
    for rel in layout.flax:
        candidates = by_module.get((*parent, *rel[:-1]), [])
        leaf = next((c for c in candidates if c.name == rel[-1]), None)
        if leaf is None:
            return None
        found.append(leaf)
    subs = {(*parent, *rel[:-1]) for rel in layout.flax}
    if sum(len(by_module[s]) for s in subs) != len(found):
        return None
    return tuple(found)


def match(
    expected: Sequence[str],
    available: Sequence[str],
    rules: Sequence[tuple[re.Pattern[str], str]],
    by_order: bool,
) -> dict[str, str]:
    """Pairs expected default names with available keys.

    Exact names come first (both sides normalised, so ``layers_0`` finds ``layers.0``), then
    names without the ``layers`` list a Sequential keeps its children in (``seq.layers.0.weight``
    finds ``seq.0.weight``: a linen ``nn.Sequential`` assigned in ``setup``, or an nnx State,
    whose module types are unknown), then ``rules`` applied to what is left, then, with
    ``by_order``, what is still left in order.

    Args:
      expected: the default PyTorch names the Flax side needs, normalised.
      available: the keys on the PyTorch side.
      rules: compiled rename rules (``compile_rename``), turning available keys into expected
        names.
      by_order: pair the leftovers in order.

    Returns:
      Expected name -> available key, for the names that found one.

    Raises:
      ValueError: when two available keys are the same name once normalised.

    Example:
      >>> match(["fc.weight", "layers.0.bias"], ["fc.weight", "layers_0.bias"], (), False)
      {'fc.weight': 'fc.weight', 'layers.0.bias': 'layers_0.bias'}
    """
    normal: dict[str, str] = {}
    for key in available:
        if normalise(key) in normal:
            raise ValueError(f"keys {normal[normalise(key)]!r} and {key!r} name the same tensor")
        normal[normalise(key)] = key
    wanted = set(expected)
    pairs = {n: k for n, k in normal.items() if n in wanted}
    used = set(pairs.values())
    for name in expected:
        found = normal.get(".".join(map(str, without_sequential_lists(tuple(name.split("."))))))
        if name not in pairs and found is not None and found not in used:
            pairs[name] = found
            used.add(found)
    if rules:
        used = set(pairs.values())
        for key in available:
            renamed = normalise(apply_rename(key, rules))
            if key not in used and renamed in wanted and renamed not in pairs:
                pairs[renamed] = key
    if by_order:
        used = set(pairs.values())
        rest = [k for k in available if k not in used]
        pairs.update(zip([e for e in expected if e not in pairs], rest, strict=False))
    return pairs


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Units and the PyTorch keys they were paired with.

    Attributes:
      found: each unit whose names all found a key, with those keys (``unit.names`` order).
      lacking: each other unit, with the names that found no key.
      unused: the keys no unit took, in their order, PyTorch-only buffers left out.
    """

    found: list[tuple[Unit, tuple[str, ...]]]
    lacking: list[tuple[Unit, tuple[str, ...]]]
    unused: list[str]


def pair(
    leaves: Sequence[Leaf],
    keys: Mapping[str, str],
    rename: Rename | None = None,
    by_order: bool = False,
) -> Pairing:
    """Groups Flax leaves into units and pairs their default names with PyTorch keys.

    Args:
      leaves: the leaves of ``flatten(variables)``.
      keys: usable PyTorch names -> original keys (``usable_names``).
      rename: rename rules turning PyTorch names into the Flax side's default names.
      by_order: pair what is left in order (see ``match``).

    Returns:
      A ``Pairing`` with original keys.

    Raises:
      ValueError: when two keys are the same name once normalised, or for a bad rule.
      TypeError: for ``rename`` of the wrong kind.

    Example:
      >>> import numpy as np
      >>> from interop._tree import flatten
      >>> leaves = flatten({"params": {"fc": {"kernel": np.zeros((2, 3))}}}).leaves
      >>> pairing = pair(leaves, {"fc.weight": "module.fc.weight", "x.bias": "module.x.bias"})
      >>> pairing.found[0][1], pairing.lacking, pairing.unused
      (('module.fc.weight',), [], ['module.x.bias'])
    """
    unit_list = units(leaves)
    available = [k for k in keys if not is_torch_only(k)]
    expected = [name for unit in unit_list for name in unit.names]
    pairs = match(expected, available, compile_rename(rename), by_order)
    found, lacking = [], []
    for unit in unit_list:
        if all(n in pairs for n in unit.names):
            found.append((unit, tuple(keys[pairs[n]] for n in unit.names)))
        else:
            lacking.append((unit, tuple(n for n in unit.names if n not in pairs)))
    used = set(pairs.values())
    return Pairing(found, lacking, [keys[k] for k in available if k not in used])
