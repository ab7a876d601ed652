"""Bytes on disk: writing files and folders atomically, and safetensors files read and written
as numpy arrays (no PyTorch needed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import safetensors
import safetensors.numpy

from interop._dtypes import from_safetensors_code, safetensors_code


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether a file is a safetensors file, told by content (its header opens with ``{``).

    Args:
      path: a file.

    Returns:
      True for a safetensors file; False for anything else (a ``torch.save`` file).

    Raises:
      FileNotFoundError: naming the file when there is none, and saying what is expected.
      OSError: when the file cannot be opened.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.bin")
      ...     save_safetensors(path, {"w": np.ones(2, np.float32)}, {})
      ...     is_safetensors(path)
      True
      >>> is_safetensors("no/ckpt.pth")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      FileNotFoundError: [Errno 2] No such file: expected a checkpoint there, ...: 'no/ckpt.pth'
    """
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            errno.ENOENT,
            "No such file: expected a checkpoint there, a torch.save file (.pth: "
            "SuperGradients' ckpt_best.pth, a state_dict) or a safetensors file, as "
            "save_checkpoint writes either",
            os.fspath(path),
        ) from e
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file's arrays, memory-mapped, and its metadata.

    The ``safetensors`` package checks the header first (offsets, sizes, dtypes); the arrays
    are then read-only views of the mapped file, so nothing is read until it is used.

    Args:
      path: a safetensors file.

    Returns:
      Its arrays by key (bfloat16 and float8 as ``ml_dtypes`` arrays), and its metadata.

    Raises:
      OSError: naming the file when it cannot be read.
      ValueError: naming the file when it is not a valid safetensors file.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.safetensors")
      ...     save_safetensors(path, {"w": np.ones(2, np.float32)}, {"epoch": "1"})
      ...     read_safetensors(path)
      ({'w': array([1., 1.], dtype=float32)}, {'epoch': '1'})
    """
    path = os.fspath(path)
    try:
        with safetensors.safe_open(path, framework="np") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}  # noqa: SIM118
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            data_size = os.fstat(f.fileno()).st_size - 8 - size
        mapped = np.memmap(path, np.uint8, mode="r", offset=8 + size) if data_size else None
        data = np.empty(0, np.uint8) if mapped is None else np.asarray(mapped)
        arrays = {}
        for key in keys:
            begin, end = header[key]["data_offsets"]
            dtype = from_safetensors_code(header[key]["dtype"])
            arrays[key] = data[begin:end].view(dtype).reshape(header[key]["shape"])
        return arrays, metadata
    except OSError as e:
        unreadable = ValueError(f"{path} is not a readable safetensors file: {first_line(e)}")
        raise io_failure(path, e) or unreadable from e
    except Exception as e:  # SafetensorError, and dtypes outside the table
        raise ValueError(f"{path} is not a readable safetensors file: {first_line(e)}") from e


def save_safetensors(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> None:
    """Writes arrays and string metadata as a safetensors file, atomically (``write_atomic``).

    Arrays that are views in another layout (a kernel transposed to PyTorch's) are made
    contiguous on every core first.

    Args:
      path: the file to write.
      arrays: keys -> numpy arrays of dtypes in the table.
      metadata: strings -> strings, stored in the file's header.

    Raises:
      TypeError: naming the first key whose dtype the format cannot hold (complex128), before
        anything is written.
      OSError: when the file cannot be written; ``path`` is then untouched.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.safetensors")
      ...     save_safetensors(path, {"w": np.ones(2, np.float32)}, {"epoch": "1"})
      ...     os.path.getsize(path)
      104
    """
    for key, array in arrays.items():
        if safetensors_code(array.dtype) is None:
            raise TypeError(
                f"{key!r} is {array.dtype}, which a safetensors file cannot hold; save it to a "
                ".pth file (torch.save) instead"
            )
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # numpy copies without the GIL
        laid_out = pool.map(lambda array: np.asarray(array, order="C"), arrays.values())
        contiguous = dict(zip(arrays, laid_out, strict=True))
    write_atomic(path, lambda temp: _save_file(contiguous, temp, dict(metadata)))


def _save_file(arrays: dict[str, np.ndarray], temp: str, metadata: dict[str, str]) -> None:
    """``safetensors.numpy.save_file``, its I/O failures raised as the OSError they are."""
    try:
        safetensors.numpy.save_file(arrays, temp, metadata=metadata)
    except safetensors.SafetensorError as e:
        if "I/O error" not in str(e):
            raise
        code = re.search(r"os error (\d+)", str(e))
        raise OSError(int(code.group(1)) if code else errno.EIO, first_line(e)) from e


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Writes a file whole or not at all: ``write(temp)`` next to ``path``, then a rename.

    As ``torch.save`` does: a symlink is written through (its target gets the content, the link
    stays), a file the caller may not write (read-only for a normal user) is refused rather
    than replaced, and a target that exists and is not a regular file (a FIFO, a device such
    as ``/dev/null``) is written in place: ``write`` fills a file in the system's temporary
    folder, whose bytes are then copied into ``path`` opened as ``open(path, "wb")`` (never
    replaced, and then not atomic); a socket is refused. The file gets the mode
    ``open(path, "wb")`` would give it (``0o666`` less the umask, or the mode of the file it
    replaces), and reaches the disk (``fsync``) before it takes the name; the folder is synced
    after the rename where the platform can. Temporary files are named
    ``.<name>.<digest of name>.<random>.tmp`` (at most 139 bytes), so one left by a killed save
    is removed by the next save to the same path.

    Args:
      path: the file to write.
      write: writes the whole content to the path it is given.

    Raises:
      PermissionError: naming ``path`` when it exists and the caller may not write it.
      OSError: naming ``path`` (not the temporary file) when it is a socket, the folder is
        not writable or the write fails (a full disk); ``path`` is then left as it was and no
        temporary file remains. Whatever else ``write`` raises passes through, with the same
        guarantee.

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
    if _is_special(target, path):  # a FIFO or a device: a rename would replace it with a file
        _write_in_place(path, target, write)
        return
    folder = os.path.dirname(target)
    # Created as open(path, "wb") creates files, so the umask (and default ACLs) apply.
    temp = _temp_beside(path, target, _create)
    mode = stat.S_IMODE(os.stat(temp).st_mode)
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


def write_folder_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Writes a folder whole or not at all: ``write(temp)`` fills a new hidden sibling folder,
    which then takes the name (a folder already there is replaced).

    Every file ``write`` makes must reach the disk itself (``write_atomic`` does); the
    temporary folder is synced, renamed, and the parent synced. An existing folder is swapped
    with the new one in one step (``renameat2(RENAME_EXCHANGE)`` on Linux) and then removed;
    where the OS or file system cannot swap, it is first renamed away and there is a moment with
    no folder under the name. A symlink is written through to its target. Temporary folders are
    named ``.<name>.<digest of name>.<random>.tmp`` (the new one while it is written; the old
    one while it is removed), so what a killed save leaves is hidden and removed by the next
    save to the same path: a crash before the swap leaves the old folder as it was, one after it
    the new folder complete (with the old one, hidden, beside it until then).

    Args:
      path: the folder to write.
      write: fills the (empty) folder it is given.

    Raises:
      OSError: naming ``path`` when the parent is not writable or the write fails; ``path`` is
        then left as it was and no temporary folder remains. Whatever else ``write`` raises
        passes through, with the same guarantee.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as parent:
      ...     path = os.path.join(parent, "model")
      ...     write_folder_atomic(path, lambda temp: open(os.path.join(temp, "a"), "w").close())
      ...     os.listdir(parent), os.listdir(path)
      (['model'], ['a'])
    """
    path = os.fspath(path).rstrip("/" + (os.altsep or "")) or os.fspath(path)
    target = os.path.realpath(path)
    parent = os.path.dirname(target)
    temp = _temp_beside(path, target, lambda new: os.mkdir(new, 0o777))
    try:
        if os.path.isdir(target):
            os.chmod(temp, stat.S_IMODE(os.stat(target).st_mode))
        write(temp)
        _fsync(temp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        if not os.path.isdir(target):
            os.rename(temp, target)
        elif not _exchange(temp, target):
            old = os.path.join(
                parent, f"{_temp_prefix(os.path.basename(target))}{secrets.token_hex(8)}.tmp"
            )
            os.rename(target, old)
            os.rename(temp, target)
            temp = old
        if hasattr(os, "O_DIRECTORY"):
            _fsync(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        shutil.rmtree(temp, ignore_errors=True)
        raise _naming(path, e) from e
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    shutil.rmtree(temp, ignore_errors=True)  # the old folder, now under the temporary name


def _temp_beside(path: str, target: str, make: Callable[[str], object]) -> str:
    """A new temporary path next to ``target``, made by ``make``, once what killed saves to
    ``target`` left there (files or folders) is removed; errors name ``path``."""
    parent, name = os.path.split(target)
    prefix = _temp_prefix(name)
    try:
        for stale in os.listdir(parent):
            if stale.startswith(prefix) and stale.endswith(".tmp"):
                left = os.path.join(parent, stale)
                if os.path.isdir(left) and not os.path.islink(left):
                    shutil.rmtree(left)
                else:
                    os.unlink(left)
        temp = os.path.join(parent, f"{prefix}{secrets.token_hex(8)}.tmp")
        make(temp)
    except OSError as e:
        raise _naming(path, e) from e
    return temp


def _create(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS
    or the file system cannot."""
    libc = (
        ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if os.name == "posix" else None
    )
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _is_special(target: str, path: str) -> bool:
    """Whether ``target`` exists and is neither a regular file nor a folder (a FIFO, a device):
    such a file is written in place, never replaced. A socket is an ``OSError`` naming
    ``path``."""
    try:
        mode = os.stat(target).st_mode
    except OSError:
        return False
    if stat.S_ISSOCK(mode):
        raise OSError(errno.ENXIO, "this is a socket, not a file; save to a file", path)
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _write_in_place(path: str, target: str, write: Callable[[str], None]) -> None:
    """``write`` into a temporary folder, then its bytes copied into ``target`` (a writer may
    replace the path it is given, as safetensors' does)."""
    with tempfile.TemporaryDirectory() as folder:
        temp = os.path.join(folder, "content")
        try:
            write(temp)
            with open(temp, "rb") as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
        except OSError as e:
            raise _naming(path, e) from e


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


def first_line(e: BaseException) -> str:
    """What went wrong, in one line of at most 200 characters.

    Args:
      e: an exception.

    Returns:
      The unpickler's own words when ``torch.load`` wraps them, else the first line of the
      message, or the exception's type.

    Example:
      >>> first_line(ValueError("bad header\\nmore"))
      'bad header'
    """
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
    line = found.group(1) if found else str(e).strip().split("\n", 1)[0]
    return line[:200] or type(e).__name__


def io_failure(path: str, e: OSError) -> OSError | None:
    """A real I/O failure as an ``OSError`` naming ``path``.

    Args:
      path: the file being read.
      e: what reading it raised.

    Returns:
      The error to raise, or None for damaged content, which readers report as ``EINVAL`` or
      without an errno.

    Example:
      >>> io_failure("ckpt.pth", OSError(errno.EIO, "Input/output error"))
      OSError(5, 'Input/output error while reading a checkpoint')
    """
    if e.errno in (None, errno.EINVAL):
        return None
    return OSError(e.errno, f"{e.strerror} while reading a checkpoint", path)
