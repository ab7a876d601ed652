"""``torch.save`` files: read the safe way (``weights_only=True``), written atomically. The only
files that need PyTorch."""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import sys
from collections import OrderedDict
from typing import Any

from interop._files import first_line, io_failure, write_atomic
from interop._torch import require


def read_pth(path: str | os.PathLike[str]) -> Any:
    """Reads a ``torch.save`` file with ``weights_only=True`` (zip files memory-mapped).

    Args:
      path: a ``torch.save`` file.

    Returns:
      What it holds.

    Raises:
      ImportError: naming the file when PyTorch is not installed.
      OSError: when the file cannot be opened.
      ValueError: naming the file when it is truncated, not a checkpoint, or needs globals that
        safe loading refuses (listing them, and how to allow exactly those).

    Example:
      >>> import tempfile, torch
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     torch.save({"net": {"fc.bias": torch.zeros(2)}, "epoch": 3}, path)
      ...     read_pth(path)
      {'net': {'fc.bias': tensor([0., 0.])}, 'epoch': 3}
    """
    path = os.fspath(path)
    torch = require(f"reading {path} (a torch.save file)")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(path, str(e)) if "GLOBAL " in str(e) else []
        if not needed:
            raise _unreadable(path, f"corrupt or not written by torch.save: {first_line(e)}") from e
        names = ", ".join(needed)
        dtypes = (
            " plus the class of each numpy dtype it stores (numpy.dtypes.Float32DType, ...)"
            if "numpy.dtype" in needed
            else ""
        )
        raise ValueError(
            f"{path} needs globals that safe loading refuses: {names}. If you trust this file, "
            f"allow exactly those{dtypes}: `with torch.serialization.safe_globals([{names}]): ...`"
        ) from e
    except OSError as e:
        unreadable = _unreadable(path, f"truncated, or not written by torch.save: {first_line(e)}")
        raise io_failure(path, e) or unreadable from e
    except Exception as e:  # a corrupt pickle fails in any of the unpickler's steps
        raise _unreadable(path, f"truncated, or not written by torch.save: {first_line(e)}") from e


def _unreadable(path: str, reason: str) -> ValueError:
    return ValueError(f"{path} is not a readable PyTorch checkpoint ({reason})")


def _unsafe_globals(path: str, message: str) -> list[str]:
    """All of them for zip files; the legacy format only tells the first refused one.

    Empty when a name cannot be a global (a damaged pickle): not a dotted name, or naming
    something a module already imported lacks (``torch._utils._rebu`` of a truncated file).
    """
    try:
        torch = require(f"reading {path} (a torch.save file)")
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy or damaged files: the one the message names
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))
    return names if all(map(_could_exist, names)) else []


def _could_exist(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    loaded = sys.modules.get(module)
    return all(p.isidentifier() for p in name.split(".")) and (
        loaded is None or hasattr(loaded, attr)
    )


def save_pth(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """Writes ``checkpoint`` with ``torch.save``, atomically (see ``write_atomic``).

    Each entry is first checked to load back with ``torch.load(weights_only=True)`` (its
    tensors stood in for by empty ones, so the check costs little), so nothing is written when
    one would not.

    Args:
      path: the file to write.
      checkpoint: what ``torch.save`` should store.

    Raises:
      ImportError: naming the file when PyTorch is not installed.
      TypeError: naming the first entry that would not load back, and what it needs.
      OSError: when the file cannot be written; ``path`` is then untouched.

    Example:
      >>> import tempfile, torch
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     save_pth(path, {"net": {"w": torch.ones(2)}, "epoch": 1})
      ...     torch.load(path, weights_only=True)["epoch"]
      1
    """
    torch = require(f"writing {os.fspath(path)} (a torch.save file)")
    for key, value in checkpoint.items():
        buffer = io.BytesIO()
        try:
            torch.save(_without_data(value), buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as e:  # pickling or safe loading refused it
            raise TypeError(
                f"entry {key!r} would not load back with torch.load(weights_only=True) "
                f"({first_line(e)}); store numbers, strings, lists, dicts and tensors instead"
            ) from e
    write_atomic(path, lambda temp: _torch_save(checkpoint, temp))


def _torch_save(checkpoint: dict[str, Any], temp: str) -> None:
    """``torch.save``, its zip writer's failures (a full disk) raised as the OSError they are.

    The entries were already pickled in memory by ``save_pth``, so a RuntimeError here comes
    from writing the file (torch reports short writes as e.g. ``unexpected pos 832 vs 726``).
    """
    try:
        require("writing a torch.save file").save(checkpoint, temp)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"torch.save could not write the file ({first_line(e)})") from e


def _without_data(value: Any) -> Any:
    """``value`` with each plain tensor in its dicts, lists and tuples made empty."""
    torch = require("writing a torch.save file")
    if type(value) in (torch.Tensor, torch.nn.Parameter) and not value.is_quantized:
        return torch.empty(0, dtype=value.dtype)
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _without_data(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(map(_without_data, value))
    return value
