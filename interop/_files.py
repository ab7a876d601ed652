"""Reading checkpoint files safely and writing them atomically (torch zip or safetensors)."""

from __future__ import annotations

import os
import pickle
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch

SECTIONS = ("net", "ema_net")
BARE = "state_dict"  # what ``sections`` calls a bare state_dict
MARKER = "jema.sections"  # safetensors metadata: the sections ``save_safetensors`` wrote


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Reads a checkpoint file the safe way.

    ``torch.save`` files load with ``weights_only=True`` (zip files memory-mapped). A safetensors
    file becomes sections (``{"net": {...}, "ema_net": {...}}``, keys without their
    ``<section>.``) when its metadata has the ``jema.sections`` marker ``save_checkpoint`` writes
    (e.g. ``"net,ema_net"``), or when every key starts with ``net.`` or ``ema_net.`` and both
    occur; any other safetensors file, e.g. one whose keys all start with ``net.`` and no marker
    (a model whose only child is ``self.net``), is a bare state_dict.

    Args:
      path: a ``torch.save`` file or a safetensors file (told apart by content, not name).

    Returns:
      What the file holds: usually a dict of sections and other entries, or a state_dict.

    Raises:
      OSError: when the file cannot be opened.
      ValueError: naming the file when it is truncated, not a checkpoint, or needs globals that
        safe loading refuses (listing them, and how to allow exactly those).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     torch.save({"net": {"fc.bias": torch.zeros(2)}, "epoch": 3}, path)
      ...     read_checkpoint(path)["epoch"]
      3
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
            metadata = f.metadata() or {}
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    heads = [key.partition(".") for key in flat]
    if MARKER in metadata:
        listed = [s for s in metadata[MARKER].split(",") if s]
        if not set(listed) <= set(SECTIONS):
            raise ValueError(
                f"{path}: metadata {MARKER!r} must list sections out of {list(SECTIONS)}; "
                f"got {metadata[MARKER]!r}"
            )
    elif {head for head, dot, _ in heads if dot} == set(SECTIONS) and all(
        dot and head in SECTIONS for head, dot, _ in heads
    ):
        listed = list(SECTIONS)
    else:
        return flat
    out: dict[str, Any] = {section: {} for section in listed}
    for (head, dot, name), (key, tensor) in zip(heads, flat.items(), strict=True):
        if dot and head in out:
            out[head][name] = tensor
        else:
            out[key] = tensor
    return out


def sections(checkpoint: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The state_dicts a checkpoint dict holds, by name.

    Args:
      checkpoint: a dict read by ``read_checkpoint``.

    Returns:
      The ``net`` and ``ema_net`` entries that are dicts, or ``{BARE: checkpoint}`` when there
      are none and every value is a tensor (a bare state_dict), else ``{}``.

    Example:
      >>> list(sections({"net": {}, "ema_net": {}, "epoch": 3}))
      ['net', 'ema_net']
      >>> list(sections({"net": torch.ones(2), "head.bias": torch.ones(2)}))
      ['state_dict']
    """
    found = {s: checkpoint[s] for s in SECTIONS if isinstance(checkpoint.get(s), Mapping)}
    if not found and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return {BARE: checkpoint}
    return found


def pick_section(checkpoint: Any, which: str, path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The state_dict to load from a checkpoint read from ``path``.

    Args:
      checkpoint: what ``read_checkpoint(path)`` returned.
      which: ``"auto"`` (``ema_net`` when present, else ``net``, else a bare state_dict),
        ``"net"`` or ``"ema_net"``.
      path: the file, for error messages.

    Returns:
      The chosen section, or ``checkpoint`` itself when it is a bare state_dict.

    Raises:
      ValueError: for an unknown ``which``, a checkpoint that is not a dict, or a section the
        file lacks (listing the keys it has).

    Example:
      >>> ckpt = {"net": {"w": torch.zeros(1)}, "ema_net": {"w": torch.ones(1)}}
      >>> pick_section(ckpt, "auto", "ckpt.pth")
      {'w': tensor([1.])}
    """
    if which not in ("auto", *SECTIONS):
        raise ValueError(f"which must be 'auto', 'net' or 'ema_net'; got {which!r}")
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    found = sections(checkpoint)
    keys = sorted(map(str, checkpoint))[:20]
    if BARE in found:
        if which == "ema_net":
            raise ValueError(f"{path} is a bare state_dict with no 'ema_net'; use which='net'")
        return checkpoint
    if not found:
        raise ValueError(f"{path} has no 'net' or 'ema_net' and is not a state_dict; keys: {keys}")
    chosen = ("ema_net" if "ema_net" in found else "net") if which == "auto" else which
    if chosen not in found:
        raise ValueError(f"{path} has no {chosen!r}; its keys are {keys}")
    return found[chosen]


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Writes a file whole or not at all: ``write(temp)`` next to ``path``, then a rename.

    The file gets the mode ``open(path, "wb")`` would give it (``0o666`` less the umask, or the
    mode of the file it replaces), and reaches the disk (``fsync``) before it takes the name; the
    folder is synced after the rename where the platform can.

    Args:
      path: the file to write.
      write: writes the whole content to the path it is given.

    Raises:
      OSError: when the folder is not writable. Whatever ``write`` raises passes through;
        ``path`` is then left as it was and no temporary file remains.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "out.bin")
      ...     write_atomic(path, lambda temp: open(temp, "wb").close())
      ...     os.listdir(folder)
      ['out.bin']
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    # Created as open(path, "wb") creates files, so the umask (and default ACLs) apply.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        if os.path.exists(path):
            mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(temp, mode | stat.S_IWUSR)  # writable while ``write`` and ``fsync`` run
        write(temp)
        _fsync(temp, os.O_RDWR)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """Writes ``checkpoint`` with ``torch.save``, atomically (see ``write_atomic``).

    Args:
      path: the file to write.
      checkpoint: what ``torch.save`` should store.

    Raises:
      OSError: when the file cannot be written; ``path`` is then untouched.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     save_torch(path, {"net": {"w": torch.ones(2)}, "epoch": 1})
      ...     torch.load(path, weights_only=True)["epoch"]
      1
    """
    write_atomic(path, lambda temp: torch.save(checkpoint, temp))


def save_safetensors(
    path: str | os.PathLike[str], sections: dict[str, Mapping[str, torch.Tensor]], metadata: dict
) -> None:
    """Writes flat ``<section>.<key>`` tensors and string metadata, atomically.

    The metadata also gets ``{"jema.sections": "net,ema_net"}`` (the section names written), so
    ``read_checkpoint`` splits the file into sections even when only ``net`` is there.

    Args:
      path: the file to write.
      sections: section names (``net``, ``ema_net``) -> state_dicts.
      metadata: strings -> strings, stored in the file's header.

    Raises:
      ValueError: when ``sections`` names something other than ``net``/``ema_net``, or
        ``metadata`` has the key ``jema.sections``.
      OSError: when the file cannot be written; ``path`` is then untouched.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.safetensors")
      ...     save_safetensors(path, {"net": {"w": torch.ones(2)}}, {"epoch": "1"})
      ...     list(read_checkpoint(path))
      ['net']
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"sections must be out of {list(SECTIONS)}; got {unknown}")
    if MARKER in metadata:
        raise ValueError(f"metadata key {MARKER!r} is reserved for the section list; rename it")
    flat = {f"{s}.{k}": t for s, sd in sections.items() for k, t in sd.items()}
    metadata = {**metadata, MARKER: ",".join(sections)}
    write_atomic(path, lambda temp: safetensors.torch.save_file(flat, temp, metadata=metadata))
