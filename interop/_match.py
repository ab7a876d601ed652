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
    match_key,
    tensor_name,
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
    names = tuple(tensor_name(module, t) for t in layout.torch)
    torch_only = tuple(tensor_name(module, t) for t, _ in layout.torch_only)
    return Unit(layout, leaves, names, torch_only)


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

    Names are compared by ``match_key`` (so ``layers_0`` finds ``layers.0`` and ``weight_g``
    finds ``parametrizations.weight.original0``). Exact names come first, then names without
    the ``layers`` list a Sequential keeps its children in (``seq.layers.0.weight`` finds
    ``seq.0.weight``: a linen ``nn.Sequential`` assigned in ``setup``, or an nnx State, whose
    module types are unknown), then ``rules`` applied to what is left, then, with ``by_order``,
    what is still left in order.

    Args:
      expected: the default PyTorch names the Flax side needs.
      available: the keys on the PyTorch side.
      rules: compiled rename rules (``compile_rename``), turning available keys into expected
        names.
      by_order: pair the leftovers in order.

    Returns:
      Expected name -> available key, for the names that found one.

    Raises:
      ValueError: when two available keys have the same ``match_key``.

    Example:
      >>> match(["fc.weight", "layers.0.bias"], ["fc.weight", "layers_0.bias"], (), False)
      {'fc.weight': 'fc.weight', 'layers.0.bias': 'layers_0.bias'}
    """
    by_key: dict[str, str] = {}
    for key in available:
        if match_key(key) in by_key:
            raise ValueError(f"keys {by_key[match_key(key)]!r} and {key!r} name the same tensor")
        by_key[match_key(key)] = key
    wanted = {match_key(name): name for name in reversed(expected)}
    pairs: dict[str, str] = {}
    used: set[str] = set()
    for without_lists in (False, True):
        for name in expected:
            parts = tuple(match_key(name).split("."))
            found = by_key.get(
                ".".join(map(str, without_sequential_lists(parts) if without_lists else parts))
            )
            if name not in pairs and found is not None and found not in used:
                pairs[name] = found
                used.add(found)
    if rules:
        for key in available:
            renamed = wanted.get(match_key(apply_rename(key, rules)))
            if key not in used and renamed is not None and renamed not in pairs:
                pairs[renamed] = key
    return pairs | (in_order(expected, available, pairs) if by_order else {})


def in_order(
    expected: Sequence[str], available: Sequence[str], pairs: Mapping[str, str]
) -> dict[str, str]:
    """Pairs the expected names and available keys that ``pairs`` left, in order.

    Args:
      expected: the default PyTorch names the Flax side needs, in its order.
      available: the keys on the PyTorch side, in their order.
      pairs: what was paired by name.

    Returns:
      Expected name -> available key for the leftovers, the first with the first.

    Example:
      >>> in_order(["a", "Dense.0.weight"], ["a", "fc.weight"], {"a": "a"})
      {'Dense.0.weight': 'fc.weight'}
    """
    used = set(pairs.values())
    rest = [k for k in available if k not in used]
    return dict(zip([e for e in expected if e not in pairs], rest, strict=False))


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Units and the PyTorch keys they were paired with.

    Attributes:
      found: each unit whose names all found a key, with those keys (``unit.names`` order).
      lacking: each other unit, with what it needs: the names that found no key, and why
        where the state_dict seems to have one (another unit took it; its other names found
        keys, which it loads only together; a prefix made it read as another name).
      unused: the keys no unit took, in their order (an incomplete unit takes none).
      by_order: the keys paired by order (``match_by_order``), in their order.
    """

    found: list[tuple[Unit, tuple[str, ...]]]
    lacking: list[tuple[Unit, str]]
    unused: list[str]
    by_order: tuple[str, ...] = ()


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
      ValueError: when two keys have the same ``match_key``, or for a bad rule.
      TypeError: for ``rename`` of the wrong kind.

    Example:
      >>> import numpy as np
      >>> from interop._tree import flatten
      >>> leaves = flatten({"params": {"fc": {"kernel": np.zeros((2, 3))}}}).leaves
      >>> pairing = pair(leaves, {"fc.weight": "module.fc.weight", "x.bias": "module.x.bias"})
      >>> pairing.found[0][1], pairing.lacking, pairing.unused, pairing.by_order
      (('module.fc.weight',), [], ['module.x.bias'], ())
    """
    unit_list = units(leaves)
    available = [k for k in keys if not is_torch_only(k)]
    expected = [name for unit in unit_list for name in unit.names]
    named = match(expected, available, compile_rename(rename), False)
    ordered = in_order(expected, available, named) if by_order else {}
    pairs = named | ordered
    found: list[tuple[Unit, tuple[str, ...]]] = []
    taken: dict[str, str] = {}  # usable key -> label of the leaf that took it
    for unit in unit_list:  # a key goes to one unit, the first that needs it
        if all(n in pairs and pairs[n] not in taken for n in unit.names):
            found.append((unit, tuple(keys[pairs[n]] for n in unit.names)))
            taken.update((pairs[n], unit.leaves[0].label) for n in unit.names)
    done = {id(unit) for unit, _ in found}
    by_key = {match_key(k): k for k in keys}
    read_as = {original: usable for usable, original in keys.items()}
    lacking = [
        (u, _needs(u, pairs, taken, by_key, read_as)) for u in unit_list if id(u) not in done
    ]
    unused = [keys[k] for k in keys if k not in taken]
    return Pairing(found, lacking, unused, tuple(keys[k] for k in ordered.values()))


def _needs(
    unit: Unit,
    pairs: Mapping[str, str],
    taken: Mapping[str, str],
    by_key: Mapping[str, str],
    read_as: Mapping[str, str],
) -> str:
    """What an incomplete unit needs, and why the state_dict's likely keys did not do: another
    unit took one (``taken``: key -> its leaf), or a prefix made the one it needs read as
    another name (``read_as``: original key -> usable name; ``by_key``: match key -> key)."""
    lacking = [n for n in unit.names if n not in pairs or pairs[n] in taken]
    notes = []
    for name in lacking:
        key = pairs.get(name) or by_key.get(match_key(name), "")
        if key in taken:
            notes.append(f"{key} went to {taken[key]}")
        elif read_as.get(name, name) != name:
            notes.append(f"the state_dict's {name} is read as {read_as[name]}")
    present = [pairs[n] for n in unit.names if n not in lacking]
    if present:
        verb = "is" if len(present) == 1 else "are"
        notes.append(f"{', '.join(present)} {verb} there but load only with it")
    return "; ".join([", ".join(lacking), *notes])
