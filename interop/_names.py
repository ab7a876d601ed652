"""Key names: Flax paths -> PyTorch-style dotted names, and PyTorch key clean-up."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

# ``_<digits>`` ending a name part, alone or in a chain (``a_1_2`` -> ``a.1.2``).
_INDEX = re.compile(r"_(\d+)(?=(?:_\d+)*(?:\.|$))")
Rename = Mapping[str, str] | Sequence[tuple[str, str]]


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
      path: linen keys or nnx attribute names and list indices.

    Returns:
      The parts joined by dots, normalised.

    Example:
      >>> dotted(("layers_0", 1)), dotted(("layers", 0, 1))
      ('layers.0.1', 'layers.0.1')
    """
    return normalise(".".join(str(part) for part in path))


def strip_module(keys: Sequence[str]) -> dict[str, str]:
    """Drops the ``module.`` prefix that DataParallel puts on every key.

    Args:
      keys: state_dict keys.

    Returns:
      Each key -> itself without ``module.`` when every key has it, else itself.

    Example:
      >>> strip_module(["module.fc.weight", "module.fc.bias"])
      {'module.fc.weight': 'fc.weight', 'module.fc.bias': 'fc.bias'}
      >>> strip_module(["module.fc.weight", "head.bias"])
      {'module.fc.weight': 'module.fc.weight', 'head.bias': 'head.bias'}
    """
    if keys and all(k.startswith("module.") for k in keys):
        return {k: k.removeprefix("module.") for k in keys}
    return {k: k for k in keys}


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


def few(names: Sequence[str], most: int) -> str:
    """The first ``most`` of ``names``, comma-separated, and how many more there are.

    Args:
      names: already formatted names (quote them first if the message should).
      most: how many to show.

    Returns:
      A short text for an error or a report.

    Example:
      >>> few(["a", "b", "c"], most=2)
      'a, b and 1 more'
    """
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more
