"""Key names: Flax paths -> PyTorch-style dotted names, and PyTorch key clean-up."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

_INDEX = re.compile(r"_(\d+)(?=\.|$)")
Rename = Mapping[str, str] | Sequence[tuple[str, str]]


def normalise(name: str) -> str:
    """Writes numbered names one way: ``layers_0.weight`` -> ``layers.0.weight``.

    Example:
      >>> normalise("block_1.conv_0.weight")
      'block.1.conv.0.weight'
    """
    return _INDEX.sub(r".\1", name)


def dotted(path: Iterable[str | int]) -> str:
    """The default PyTorch name of a Flax module path: ``("layers_0", 1)`` -> ``layers.0.1``."""
    return normalise(".".join(str(part) for part in path))


def strip_module(keys: Sequence[str]) -> dict[str, str]:
    """Maps each key to itself, without ``module.`` when every key has it (DataParallel)."""
    if keys and all(k.startswith("module.") for k in keys):
        return {k: k.removeprefix("module.") for k in keys}
    return {k: k for k in keys}


def compile_rename(rename: Rename | None) -> tuple[tuple[re.Pattern[str], str], ...]:
    """Validates ``rename`` rules (regex -> replacement), keeping their order.

    Raises:
      TypeError: when ``rename`` is not a mapping or a sequence of pairs.
      ValueError: naming a pattern that is not a valid regular expression.
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
    """Applies every rule in order with ``re.sub``."""
    for pattern, replacement in rules:
        name = pattern.sub(replacement, name)
    return name
