"""Reading checkpoint files safely and writing them atomically (torch zip or safetensors)."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch

SECTIONS = ("net", "ema_net")


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Reads a ``torch.save`` file with ``weights_only=True`` (zip files memory-mapped), or a
    safetensors file (flat ``net.<key>``/``ema_net.<key>`` keys become sections).

    Raises:
      OSError: when the file cannot be opened.
      ValueError: naming the file when it is truncated, not a checkpoint, or needs globals that
        safe loading refuses (listing them, and how to allow exactly those).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    try:
        return torch.load(
            path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK\x03\x04")
        )
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(path, str(e))
        if not needed:
            raise _unreadable(path, "not written by torch.save") from e
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
    except (RuntimeError, EOFError, KeyError, ValueError, UnicodeDecodeError) as e:
        reason = str(e).strip().split("\n", 1)[0][:200] or type(e).__name__
        raise _unreadable(path, f"truncated, or not written by torch.save: {reason}") from e


def _unreadable(path: str, reason: str) -> ValueError:
    return ValueError(f"{path} is not a readable PyTorch checkpoint ({reason})")


def _unsafe_globals(path: str, message: str) -> list[str]:
    """All of them for zip files; the legacy format only tells the first refused one."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (RuntimeError, ValueError):
        return sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))


def _read_safetensors(path: str) -> dict[str, Any]:
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            flat = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if not any(k.startswith(tuple(f"{s}." for s in SECTIONS)) for k in flat):
        return flat
    out: dict[str, Any] = {}
    for key, tensor in flat.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = tensor
    return out


def pick_section(checkpoint: Any, which: str, path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The state_dict to load: ``ema_net`` when present else ``net`` for ``which="auto"``.

    Raises:
      ValueError: for an unknown ``which``, a checkpoint that is not a dict, or a section the
        file lacks (listing the keys it has).
    """
    if which not in ("auto", *SECTIONS):
        raise ValueError(f"which must be 'auto', 'net' or 'ema_net'; got {which!r}")
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    has = [s for s in SECTIONS if checkpoint.get(s) is not None]
    keys = sorted(map(str, checkpoint))[:20]
    if not has:
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            if which == "ema_net":
                raise ValueError(f"{path} is a bare state_dict with no 'ema_net'; use which='net'")
            return checkpoint
        raise ValueError(f"{path} has no 'net' or 'ema_net' and is not a state_dict; keys: {keys}")
    chosen = ("ema_net" if "ema_net" in has else "net") if which == "auto" else which
    if chosen not in has:
        raise ValueError(f"{path} has no {chosen!r}; its keys are {keys}")
    return checkpoint[chosen]


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Calls ``write(temp_path)`` next to ``path``, then renames; never leaves half a file."""
    path = os.fspath(path)
    fd, temp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(path)),
        prefix=f".{os.path.basename(path)}.",
        suffix=".tmp",
    )
    os.close(fd)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def save_torch(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """Writes ``checkpoint`` with ``torch.save``, atomically."""
    write_atomic(path, lambda temp: torch.save(checkpoint, temp))


def save_safetensors(
    path: str | os.PathLike[str], sections: dict[str, Mapping[str, torch.Tensor]], metadata: dict
) -> None:
    """Writes flat ``<section>.<key>`` tensors and string metadata, atomically."""
    flat = {f"{s}.{k}": t for s, sd in sections.items() for k, t in sd.items()}
    write_atomic(path, lambda temp: safetensors.torch.save_file(flat, temp, metadata=metadata))
