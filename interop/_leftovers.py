"""PyTorch keys no Flax leaf took: ties, PyTorch-only tensors, and the rest.

Tied keys name one tensor (a GPT-2 ``lm_head.weight`` and its ``transformer.wte.weight``;
BART's ``shared``, ``encoder.embed_tokens`` and ``decoder.embed_tokens``), found by shared
memory, or by equal bits where a file lost it. PyTorch-only tensors are those
``_layouts.is_torch_only`` names. Both are notes in a report; the rest are mismatches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from interop._dtypes import as_numpy
from interop._layouts import is_torch_only
from interop._match import Pairing
from interop._report import Problems
from interop._types import StateDict

Identity = tuple[int, tuple[int, ...], tuple[int, ...], str]


def identity(value: Any) -> Identity | None:
    """Where a tensor's or array's values live: two keys with one identity are one tensor.

    Args:
      value: a tensor or array.

    Returns:
      Its address, shape, strides and dtype; None for one without data in this process's
      memory (a meta tensor) or with no elements.

    Example:
      >>> w = np.ones((3, 2))
      >>> identity(w) == identity(w[:]), identity(w) == identity(w.copy())
      (True, False)
    """
    try:
        array = as_numpy(value)
    except TypeError:
        return None
    if array.size == 0:
        return None
    return array.__array_interface__["data"][0], array.shape, array.strides, array.dtype.str


def ties(
    aliases: Iterable[str], sources: Sequence[str], values: Mapping[str, Any]
) -> dict[str, tuple[str, str]]:
    """Which keys are another name of a source key's tensor.

    A key is tied to a source that shares its memory (a state_dict in memory, a ``torch.save``
    file), else to one with the same shape, dtype and bits, unless all its elements are equal
    (a file that lost the sharing, e.g. a safetensors file; a constant such as a fresh
    LayerNorm's ones is no evidence of a tie).

    Args:
      aliases: the keys that may be aliases.
      sources: the keys they may be tied to, in order of preference.
      values: keys -> tensors or arrays.

    Returns:
      Alias -> (its source, ``"same tensor"`` or ``"equal values"``), for the aliases found.

    Example:
      >>> w = np.arange(6.0).reshape(3, 2)
      >>> ties(["head.weight", "copy"], ["wte.weight"], {"wte.weight": w, "head.weight": w,
      ...                                                 "copy": w.copy()})
      {'head.weight': ('wte.weight', 'same tensor'), 'copy': ('wte.weight', 'equal values')}
    """
    by_identity: dict[Identity, str] = {}
    by_shape: dict[tuple[tuple[int, ...], str], list[str]] = {}
    for source in reversed(sources):
        found = identity(values[source])
        if found is not None:
            by_identity[found] = source
    for source in sources:
        array = _numpy(values[source])
        if array is not None:
            by_shape.setdefault((array.shape, array.dtype.str), []).append(source)
    out = {}
    for alias in aliases:
        found = identity(values[alias])
        if found in by_identity:
            out[alias] = (by_identity[found], "same tensor")
            continue
        array = _numpy(values[alias])
        if array is None or not _varies(array):
            continue
        for source in by_shape.get((array.shape, array.dtype.str), []):
            if same_bits(array, values[source]):
                out[alias] = (source, "equal values")
                break
    return out


def same_bits(a: Any, b: Any) -> bool:
    """Whether two tensors or arrays hold the same dtype, shape and bits (NaNs alike).

    Args:
      a, b: tensors or arrays.

    Returns:
      True when they are bit for bit the same.

    Example:
      >>> same_bits(np.array([np.nan, 0.0]), np.array([np.nan, 0.0]))
      True
      >>> same_bits(np.array([0.0]), np.array([-0.0]))
      False
    """
    x, y = _numpy(a), _numpy(b)
    if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
        return False
    return bool(np.array_equal(_bytes(x), _bytes(y)))


def _numpy(value: Any) -> np.ndarray | None:
    try:
        return as_numpy(value)
    except TypeError:
        return None


def _bytes(array: np.ndarray) -> np.ndarray:
    """One row of bytes per element."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(np.uint8).reshape(flat.size, array.dtype.itemsize)


def _varies(array: np.ndarray) -> bool:
    rows = _bytes(array)
    return bool(len(rows) > 1 and (rows != rows[0]).any())


def sort_leftovers(
    pairing: Pairing,
    state_dict: StateDict,
    buffers: frozenset[str],
    problems: Problems,
    rest: list[str],
) -> dict[str, str]:
    """Sorts the keys no Flax leaf took into ties and PyTorch-only tensors, noted in
    ``problems``, and the rest.

    Args:
      pairing: what ``pair`` found.
      state_dict: the PyTorch side (a state_dict loaded, or the template saved into).
      buffers: which keys are a module's buffers (empty when unknown).
      problems: where the notes go (``tied``, ``torch_only``).
      rest: where the other keys go (``problems.unexpected`` loading, ``missing`` saving).

    Returns:
      Each tied key -> the key it is tied to.

    Example:
      >>> from interop._match import pair
      >>> from interop._tree import flatten
      >>> w = np.arange(6.0).reshape(2, 3)
      >>> leaves = flatten({"params": {"wte": {"embedding": w}}}).leaves
      >>> pairing = pair(leaves, {k: k for k in ("wte.weight", "head.weight", "x.bias")})
      >>> problems = Problems()
      >>> sort_leftovers(pairing, {"wte.weight": w, "head.weight": w, "x.bias": np.ones(2)},
      ...                frozenset(), problems, problems.unexpected)
      {'head.weight': 'wte.weight'}
      >>> problems.tied, problems.unexpected
      (['head.weight: tied to wte.weight (same tensor)'], ['x.bias'])
    """
    sources = [key for _, keys in pairing.found for key in keys]
    tied = ties(pairing.unused, sources, state_dict)
    problems.tied += [f"{alias}: tied to {source} ({how})" for alias, (source, how) in tied.items()]
    for key in pairing.unused:
        if key not in tied and is_torch_only(key, state_dict[key], key in buffers):
            problems.torch_only.append(key)
        elif key not in tied:
            rest.append(key)
    return {alias: source for alias, (source, _) in tied.items()}


def conflicts(produced: Mapping[str, np.ndarray], template: StateDict) -> list[str]:
    """Keys of one tensor in the template (tied) that are to get different values, of which
    ``load_state_dict`` would keep whichever it copies last.

    Args:
      produced: the keys converted from Flax -> their new values.
      template: the state_dict they go into.

    Returns:
      One line per such group of keys.

    Example:
      >>> w = np.zeros(3)
      >>> conflicts({"a": np.ones(3), "b": np.zeros(3)}, {"a": w, "b": w})
      ['a, b: one tensor in the template (tied), different values from Flax']
    """
    groups: dict[Identity, list[str]] = {}
    for key in produced:
        found = identity(template[key])
        if found is not None:
            groups.setdefault(found, []).append(key)
    return [
        f"{', '.join(keys)}: one tensor in the template (tied), different values from Flax"
        for keys in groups.values()
        if any(not same_bits(produced[k], produced[keys[0]]) for k in keys[1:])
    ]
