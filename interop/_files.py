"""Bytes on disk: reading ``torch.save`` and safetensors files safely, writing them atomically."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import secrets
import stat
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import safetensors
import safetensors.torch
import torch


def read_file(path: str | os.PathLike[str]) -> tuple[Any, dict[str, str] | None]:
    """Reads a ``torch.save`` or safetensors file the safe way.

    ``torch.save`` files load with ``weights_only=True`` (zip files memory-mapped).

    Args:
      path: a ``torch.save`` file or a safetensors file (told apart by content, not name).

    Returns:
      What a ``torch.save`` file holds and None, or a safetensors file's tensors by key and its
      metadata.

    Raises:
      OSError: when the file cannot be opened.
      ValueError: naming the file when it is truncated, not a checkpoint, or needs globals that
        safe loading refuses (listing them, and how to allow exactly those).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     torch.save({"net": {"fc.bias": torch.zeros(2)}, "epoch": 3}, path)
      ...     read_file(path)
      ({'net': {'fc.bias': tensor([0., 0.])}, 'epoch': 3}, None)
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    try:
        content = torch.load(
            path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK\x03\x04")
        )
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(path, str(e)) if "GLOBAL " in str(e) else []
        if not needed:
            raise _unreadable(path, f"corrupt or not written by torch.save: {_first(e)}") from e
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
        unreadable = _unreadable(path, f"truncated, or not written by torch.save: {_first(e)}")
        raise _io_failure(path, e) or unreadable from e
    except Exception as e:  # a corrupt pickle fails in any of the unpickler's steps
        raise _unreadable(path, f"truncated, or not written by torch.save: {_first(e)}") from e
    return content, None


def _unreadable(path: str, reason: str) -> ValueError:
    return ValueError(f"{path} is not a readable PyTorch checkpoint ({reason})")


def _io_failure(path: str, e: OSError) -> OSError | None:
    """A real I/O failure as an ``OSError`` naming ``path``; None for damaged content, which
    readers report as ``EINVAL`` or without an errno."""
    if e.errno in (None, errno.EINVAL):
        return None
    return OSError(e.errno, f"{e.strerror} while reading a checkpoint", path)


def _first(e: Exception) -> str:
    """What went wrong, in one line of at most 200 characters: the unpickler's own words when
    ``torch.load`` wraps them, else the first line of the message, or the exception's type."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
    line = found.group(1) if found else str(e).strip().split("\n", 1)[0]
    return line[:200] or type(e).__name__


def _unsafe_globals(path: str, message: str) -> list[str]:
    """All of them for zip files; the legacy format only tells the first refused one.

    Empty when a name cannot be a global (a damaged pickle): not a dotted name, or naming
    something a module already imported lacks (``torch._utils._rebu`` of a truncated file).
    """
    try:
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


def _read_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            flat = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
            return flat, f.metadata() or {}
    except OSError as e:
        unreadable = ValueError(f"{path} is not a readable safetensors file: {_first(e)}")
        raise _io_failure(path, e) or unreadable from e
    except Exception as e:  # SafetensorError, and what a damaged header makes torch raise
        raise ValueError(f"{path} is not a readable safetensors file: {_first(e)}") from e


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Writes a file whole or not at all: ``write(temp)`` next to ``path``, then a rename.

    As ``torch.save`` does: a symlink is written through (its target gets the content, the link
    stays), and a file the caller may not write (read-only for a normal user) is refused rather
    than replaced. The file gets the mode ``open(path, "wb")`` would give it (``0o666`` less the
    umask, or the mode of the file it replaces), and reaches the disk (``fsync``) before it
    takes the name; the folder is synced after the rename where the platform can. Temporary
    files are named ``.<name>.<digest of name>.<random>.tmp`` (at most 139 bytes), so one left by
    a killed save is removed by the next save to the same path.

    Args:
      path: the file to write.
      write: writes the whole content to the path it is given.

    Raises:
      PermissionError: naming ``path`` when it exists and the caller may not write it.
      OSError: naming ``path`` (not the temporary file) when the folder is not writable or the
        write fails (a full disk); ``path`` is then left as it was and no temporary file
        remains. Whatever else ``write`` raises passes through, with the same guarantee.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "out.bin")
      ...     write_atomic(path, lambda temp: open(temp, "wb").close())
      ...     os.listdir(folder)
      ['out.bin']
    """
    path = os.fspath(path)
    target = os.path.realpath(path)  # through symlinks, as open(path, "wb") goes
    if os.path.exists(target) and not os.access(target, os.W_OK):
        raise PermissionError(
            errno.EACCES, "Permission denied: the file is read-only, so torch.save refuses it "
            "too; make it writable or save elsewhere", path
        )  # fmt: skip
    folder, name = os.path.split(target)
    prefix = _temp_prefix(name)
    try:
        for stale in os.listdir(folder):
            if stale.startswith(prefix) and stale.endswith(".tmp"):
                os.unlink(os.path.join(folder, stale))
        temp = os.path.join(folder, f"{prefix}{secrets.token_hex(8)}.tmp")
        # Created as open(path, "wb") creates files, so the umask (and default ACLs) apply.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise _naming(path, e) from e
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        if os.path.exists(target):
            mode = stat.S_IMODE(os.stat(target).st_mode)
        os.chmod(temp, mode | stat.S_IWUSR)  # writable while ``write`` and ``fsync`` run
        write(temp)
        _fsync(temp, os.O_RDWR)
        os.chmod(temp, mode)
        os.replace(temp, target)
    except OSError as e:
        os.unlink(temp)
        raise _naming(path, e) from e
    except BaseException:
        os.unlink(temp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        _fsync(folder, os.O_RDONLY | os.O_DIRECTORY)


def _temp_prefix(name: str) -> str:
    """``.<first 100 bytes of name>.<16 hex digits of its hash>.``: the same for every save to
    one file, different for two names that share their first 100 bytes."""
    raw = os.fsencode(name)
    return f".{os.fsdecode(raw[:100])}.{hashlib.sha256(raw).hexdigest()[:16]}."


def _naming(path: str, e: OSError) -> OSError:
    """``e`` as raised for ``path``, the user's file, rather than a temporary one."""
    if e.errno is None:
        return OSError(f"cannot write {path}: {e}")
    return type(e)(e.errno, e.strerror, path)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_torch(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """Writes ``checkpoint`` with ``torch.save``, atomically (see ``write_atomic``).

    Each entry is first checked to load back with ``torch.load(weights_only=True)`` (its
    tensors stood in for by empty ones, so the check costs little), so nothing is written when
    one would not.

    Args:
      path: the file to write.
      checkpoint: what ``torch.save`` should store.

    Raises:
      TypeError: naming the first entry that would not load back, and what it needs.
      OSError: when the file cannot be written; ``path`` is then untouched.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     save_torch(path, {"net": {"w": torch.ones(2)}, "epoch": 1})
      ...     torch.load(path, weights_only=True)["epoch"]
      1
    """
    for key, value in checkpoint.items():
        buffer = io.BytesIO()
        try:
            torch.save(_without_data(value), buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as e:  # pickling or safe loading refused it
            raise TypeError(
                f"entry {key!r} would not load back with torch.load(weights_only=True) "
                f"({_first(e)}); store numbers, strings, lists, dicts and tensors instead"
            ) from e
    write_atomic(path, lambda temp: _torch_save(checkpoint, temp))


def _torch_save(checkpoint: dict[str, Any], temp: str) -> None:
    """``torch.save``, its zip writer's failures (a full disk) raised as the OSError they are.

    The entries were already pickled in memory by ``save_torch``, so a RuntimeError here comes
    from writing the file (torch reports short writes as e.g. ``unexpected pos 832 vs 726``).
    """
    try:
        torch.save(checkpoint, temp)
    except RuntimeError as e:
        raise OSError(errno.EIO, f"torch.save could not write the file ({_first(e)})") from e


def _safetensors_save(
    tensors: dict[str, torch.Tensor], temp: str, metadata: dict[str, str]
) -> None:
    """``safetensors.torch.save_file``, its I/O failures raised as the OSError they are."""
    try:
        safetensors.torch.save_file(tensors, temp, metadata=metadata)
    except safetensors.SafetensorError as e:
        if "I/O error" not in str(e):
            raise
        code = re.search(r"os error (\d+)", str(e))
        raise OSError(int(code.group(1)) if code else errno.EIO, _first(e)) from e


def _without_data(value: Any) -> Any:
    """``value`` with each plain tensor in its dicts, lists and tuples made empty."""
    if type(value) in (torch.Tensor, torch.nn.Parameter) and not value.is_quantized:
        return torch.empty(0, dtype=value.dtype)
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _without_data(v)) for k, v in value.items())
    if type(value) in (list, tuple):
        return type(value)(map(_without_data, value))
    return value


def save_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Writes tensors and string metadata as a safetensors file, atomically.

    Args:
      path: the file to write.
      tensors: keys -> tensors.
      metadata: strings -> strings, stored in the file's header.

    Raises:
      OSError: when the file cannot be written; ``path`` is then untouched.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.safetensors")
      ...     save_safetensors(path, {"w": torch.ones(2)}, {"epoch": "1"})
      ...     read_file(path)
      ({'w': tensor([1., 1.])}, {'epoch': '1'})
    """
    write_atomic(path, lambda temp: _safetensors_save(dict(tensors), temp, metadata))
