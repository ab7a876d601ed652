"""A plain-text summary of a checkpoint file or Hugging Face folder, for ``jema inspect CKPT``."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from interop._dtypes import as_numpy, is_array
from interop._files import is_safetensors, read_safetensors
from interop._hf import is_folder, read_folder
from interop._report import few
from interop._schema import BARE, MARKER, TIES, read_checkpoint, sections


def inspect_checkpoint(path: str | os.PathLike[str]) -> str:
    """Describes a checkpoint: sections, tensor and parameter counts, dtypes, other keys, and
    for files with both ``net`` and ``ema_net`` their relative distance per layer, followed by
    ``not compared (...)`` lines naming keys missing on one side or of different shapes.

    The file is read as ``load_checkpoint`` reads it (``read_checkpoint``, no PyTorch needed).
    A safetensors file's metadata shows as a ``.pth``'s other keys do, a line per key in sorted
    order (the format keeps none; values that are JSON, as ``save_checkpoint`` writes them,
    decoded), except the ``jema.sections`` and ``jema.tied`` records the sections reflect.

    A Hugging Face folder (or its ``*.index.json``) is read as ``load_checkpoint`` reads it;
    its first line counts its weight files and their bytes.

    Args:
      path: a ``.pth``/``.pt`` or ``.safetensors`` file, or a Hugging Face folder.

    Returns:
      The report, one item per line.

    Raises:
      OSError: when the file cannot be opened.
      ValueError: naming the file when it is unreadable, unsafe or not a dict, or a section
        does not map names to tensors; for a bad folder, as ``load_checkpoint``.

    Example:
      >>> import os, tempfile
      >>> from interop._files import save_safetensors
      >>> path = os.path.join(tempfile.mkdtemp(), "sd.safetensors")
      >>> save_safetensors(path, {"fc.weight": np.ones((3, 2), np.float32)}, {"epoch": "3"})
      >>> inspect_checkpoint(path).splitlines()[1:]
      ['state_dict: 1 tensors, 6 parameters, dtypes float32 x1', 'epoch: 3']
    """
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{os.fspath(path)} holds a {type(checkpoint).__name__}, not a dict")
    folder = read_folder(path) if is_folder(path) else None
    if folder is not None:
        size = sum(os.path.getsize(file) for file in folder.files)
        files = len(folder.files)
        lines = [f"{os.fspath(path)} (Hugging Face folder: {files} files, {size:,} bytes)"]
        metadata = folder.metadata
    else:
        lines = [f"{os.fspath(path)} ({os.path.getsize(path):,} bytes)"]
        metadata = read_safetensors(path)[1] if is_safetensors(path) else {}
    found = sections(checkpoint, path)
    for name, state_dict in found.items():
        lines.append(f"{name}: {_summary(state_dict)}")
    others = [] if BARE in found else [k for k in checkpoint if k not in found]
    if not found:
        lines.append("no 'net', 'ema_net' or state_dict found")
    lines += [f"{k}: {_describe(checkpoint[k])}" for k in others]
    lines += [f"{k}: {_describe(v)}" for k, v in _own(metadata).items()]
    if len(found) == 2:
        lines.append("relative distance |net - ema_net| / |net| per layer:")
        lines += _distances(found["net"], found["ema_net"])
    return "\n".join(lines)


def _own(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Safetensors metadata by key, JSON values decoded, without jema's own records."""
    return {k: _decoded(v) for k, v in sorted(metadata.items()) if k not in (MARKER, TIES)}


def _decoded(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _summary(state_dict: Mapping[str, Any]) -> str:
    tensors = [t for t in state_dict.values() if is_array(t)]
    dtypes = Counter(_dtype_name(t) for t in tensors)
    kinds = ", ".join(f"{d} x{n}" for d, n in sorted(dtypes.items()))
    total = sum(math.prod(t.shape) for t in tensors)
    return f"{len(tensors)} tensors, {total:,} parameters, dtypes {kinds or '-'}"


def _dtype_name(array: Any) -> str:
    """``float32``, ``bfloat16``, ... alike for tensors and numpy arrays."""
    return str(array.dtype).removeprefix("torch.")


def _describe(value: Any) -> str:
    if isinstance(value, int | float | str | bool) or value is None:
        return repr(value)[:80]
    if is_array(value):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, Mapping):
        return f"dict with {len(value)} keys"
    return type(value).__name__


def _distances(net: Mapping[str, Any], ema: Mapping[str, Any]) -> list[str]:
    """The table, then a line per kind of key left out: missing on one side or mis-shaped."""
    layers: dict[str, list[float]] = {}
    missing, extra, shapes, unreadable = [], [k for k in ema if k not in net], [], []
    for key, tensor in net.items():
        if not is_array(ema.get(key)):
            missing.append(key)
            continue
        other = ema[key]
        if other.shape != tensor.shape:
            shapes.append(f"{key} (net {tuple(tensor.shape)}, ema_net {tuple(other.shape)})")
            continue
        if not _dtype_name(tensor).startswith(("float", "bfloat")):
            continue
        try:
            a, b = as_numpy(tensor).astype(np.float64), as_numpy(other).astype(np.float64)
        except TypeError as e:
            unreadable.append(f"{key} ({e})".partition(";")[0] + ")")
            continue
        sums = layers.setdefault(key.rpartition(".")[0] or key, [0.0, 0.0])
        sums[0] += float(np.sum((a - b) ** 2))
        sums[1] += float(np.sum(a**2))
    width = max((len(k) for k in layers), default=0)
    lines = [f"  {layer:<{width}}  {_relative(d, n):.3e}" for layer, (d, n) in layers.items()]
    for what, keys in (
        ("missing in ema_net", missing),
        ("missing in net", extra),
        ("shape differs", shapes),
        ("no dense data", unreadable),
    ):
        if keys:
            lines.append(f"not compared ({what}): {few(keys, most=10)}")
    return lines


def _relative(squared_diff: float, squared_norm: float) -> float:
    if squared_norm == 0:
        return 0.0 if squared_diff == 0 else float("inf")
    return float(np.sqrt(squared_diff / squared_norm))
