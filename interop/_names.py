"""Every naming rule: Flax paths -> PyTorch dotted names, Sequential lists, weight norm's two
spellings, ``module.`` and user prefixes, and rename rules.

Numbers: in a module path, a part ending in ``_<digits>`` is a list index (linen's
``layers_0`` and nnx's ``("layers", 0)`` are PyTorch's ``layers.0``); a tensor's own name is
kept as it is (``gamma_1`` of a layer-scale block stays ``gamma_1``). Names are compared with
every ``_<digits>`` made an index on both sides (``match_key``), so either spelling finds the
other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

Path = tuple[str | int, ...]
Rename = Mapping[str, str] | Sequence[tuple[str, str]]

# ``_<digits>`` ending a name part, alone or in a chain (``a_1_2`` -> ``a.1.2``).
_INDEX = re.compile(r"_(\d+)(?=(?:_\d+)*(?:\.|$))")
_MODULE = "module."  # what DataParallel puts in front of every key
_LIST = "layers"  # where Flax's Sequential modules keep their children
# torch.nn.utils.parametrizations.weight_norm's names for the legacy weight_norm's g and v.
_WEIGHT_NORM = re.compile(r"(^|\.)parametrizations\.(\w+)\.original([01])$")


def normalise(name: str) -> str:
    """Writes numbered names one way: ``layers_0.weight`` -> ``layers.0.weight``.

    Idempotent, so a linen list ``a_1_2``, an nnx path ``("a_1", 2)`` and PyTorch's ``a_1.2``
    all become ``a.1.2``.

    Args:
      name: a dotted name.

    Returns:
      The name with every ``_<digits>`` that ends a part (or a chain of them) made a part.

    Example:
      >>> normalise("block_1.conv_0.weight"), normalise("stage_1_2.bias")
      ('block.1.conv.0.weight', 'stage.1.2.bias')
    """
    return _INDEX.sub(r".\1", name)


def dotted(path: Iterable[str | int]) -> str:
    """The default PyTorch name of a Flax module path.

    Args:
      path: linen keys, or nnx attribute names and list indices.

    Returns:
      The parts joined by dots, normalised.

    Example:
      >>> dotted(("layers_0", 1)), dotted(("layers", 0, "block_2"))
      ('layers.0.1', 'layers.0.block.2')
    """
    return normalise(".".join(str(part) for part in path))


def tensor_name(module: Path, name: str) -> str:
    """The default PyTorch name of a tensor: its module's dotted path, then its own name as is.

    Args:
      module: the module path (see ``dotted``).
      name: the tensor's name relative to the module, e.g. ``weight`` or ``gamma_1``.

    Returns:
      The dotted name.

    Example:
      >>> tensor_name(("blocks_0",), "gamma_1"), tensor_name((), "cls_token")
      ('blocks.0.gamma_1', 'cls_token')
    """
    return ".".join(filter(None, (dotted(module), name)))


def match_key(name: str) -> str:
    """What two names are compared by: normalised, and weight norm spelled one way.

    ``<m>.parametrizations.<w>.original0``/``original1`` (``torch.nn.utils.parametrizations.
    weight_norm``) are the legacy ``weight_norm``'s ``<m>.<w>_g``/``<m>.<w>_v``, same values.

    Args:
      name: a dotted name.

    Returns:
      Its key; two names match when their keys are equal.

    Example:
      >>> match_key("conv.parametrizations.weight.original0"), match_key("blk.gamma_1")
      ('conv.weight_g', 'blk.gamma.1')
    """
    return normalise(_WEIGHT_NORM.sub(lambda m: f"{m[1]}{m[2]}_{'gv'[int(m[3])]}", name))


def without_sequential_lists(
    path: Path, is_sequential: Callable[[Path], bool] = lambda module: True
) -> Path:
    """``path`` without the ``layers`` list a Flax Sequential keeps its children in.

    ``nnx.Sequential`` and linen's ``nn.Sequential`` hold their children in a list
    ``layers`` (nnx ``("layers", 0)``, linen ``layers_0``), where PyTorch's
    ``nn.Sequential`` numbers them directly (``0``). A ``layers`` part is left out when an
    index and at least one more part follow it and the module it belongs to is a Sequential.

    Args:
      path: a module path and tensor name, e.g. ``("head", "layers", 0, "weight")``, or a
        normalised dotted name split at the dots.
      is_sequential: whether the module at a path prefix is a Sequential; by default every
        module is taken for one (module types unknown).

    Returns:
      The path as PyTorch would name it.

    Example:
      >>> without_sequential_lists(("head", "layers", 0, "weight"))
      ('head', 0, 'weight')
      >>> ".".join(without_sequential_lists(tuple("layers.layers.2.bias".split("."))))
      'layers.2.bias'
      >>> without_sequential_lists(("layers", 0, "weight"), lambda module: False)
      ('layers', 0, 'weight')
    """
    return tuple(
        part
        for i, part in enumerate(path)
        if not (
            part == _LIST
            and i + 2 < len(path)
            and str(path[i + 1]).isdigit()
            and is_sequential(path[:i])
        )
    )


def usable_names(keys: Iterable[str], prefix: str | None = None) -> dict[str, str]:
    """The names PyTorch keys are matched by, mapped to the keys.

    The ``module.`` prefix that DataParallel puts on every key is dropped (only when every key
    has it); with ``prefix`` (e.g. ``"teacher."`` of a KD model), only keys starting with it
    are kept, without it.

    Args:
      keys: state_dict keys.
      prefix: the part of a composite state_dict to keep, or None for all of it.

    Returns:
      Usable name -> original key, in the keys' order.

    Raises:
      ValueError: when no key starts with ``prefix``, listing how the keys start.

    Example:
      >>> usable_names(["module.fc.weight", "module.fc.bias"])
      {'fc.weight': 'module.fc.weight', 'fc.bias': 'module.fc.bias'}
      >>> usable_names(["student.fc.bias", "teacher.fc.bias"], prefix="teacher.")
      {'fc.bias': 'teacher.fc.bias'}
    """
    keys = list(keys)
    strip = bool(keys) and all(k.startswith(_MODULE) for k in keys)
    names = {k.removeprefix(_MODULE) if strip else k: k for k in keys}
    if prefix is None:
        return names
    kept = {s.removeprefix(prefix): k for s, k in names.items() if s.startswith(prefix)}
    if not kept:
        heads = sorted({s.split(".", 1)[0] + "." for s in names})
        raise ValueError(f"no key starts with prefix {prefix!r}; the keys start with {heads}")
    return kept


def all_under(keys: Iterable[str], prefix: str) -> bool:
    """Whether every usable name (``module.`` dropped) starts with ``prefix``.

    Args:
      keys: state_dict keys.
      prefix: e.g. ``"net."``.

    Returns:
      True for a non-empty set of keys all starting with ``prefix``.

    Example:
      >>> all_under(["module.net.fc.weight", "module.net.fc.bias"], "net."), all_under([], "net.")
      (True, False)
    """
    names = usable_names(str(k) for k in keys)
    return bool(names) and all(name.startswith(prefix) for name in names)


def compile_rename(rename: Rename | None) -> tuple[tuple[re.Pattern[str], str], ...]:
    """Validates ``rename`` rules (regex -> replacement), keeping their order.

    Args:
      rename: ``{pattern: replacement}`` or ``[(pattern, replacement), ...]``, or None.

    Returns:
      ``(compiled pattern, replacement)`` pairs, in order; ``()`` for None.

    Raises:
      TypeError: when ``rename`` is not a mapping or a sequence of pairs.
      ValueError: naming a pattern that is not a valid regular expression.

    Example:
      >>> [(p.pattern, r) for p, r in compile_rename({r"^backbone\\.": "", "bn": "norm"})]
      [('^backbone\\\\.', ''), ('bn', 'norm')]
    """
    if rename is None:
        return ()
    pairs = list(rename.items()) if isinstance(rename, Mapping) else list(rename)
    if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
        raise TypeError(
            f"rename must be a mapping or a sequence of (pattern, replacement) pairs; "
            f"got {rename!r}"
        )
    compiled = []
    for pattern, replacement in pairs:
        try:
            compiled.append((re.compile(pattern), replacement))
        except re.error as e:
            raise ValueError(f"rename pattern {pattern!r} is not a valid regex: {e}") from e
    return tuple(compiled)


def apply_rename(name: str, rules: Sequence[tuple[re.Pattern[str], str]]) -> str:
    """Applies every rule in order with ``re.sub``.

    Args:
      name: a PyTorch key.
      rules: what ``compile_rename`` returned.

    Returns:
      The renamed key.

    Raises:
      re.error: for a replacement that refers to a group the pattern lacks.

    Example:
      >>> apply_rename("backbone.bn1.weight", compile_rename({r"^backbone\\.": "", "bn": "norm"}))
      'norm1.weight'
    """
    for pattern, replacement in rules:
        name = pattern.sub(replacement, name)
    return name
