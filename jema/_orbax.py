"""The orbax folder rules ``checkpoint`` and ``posthoc`` share: managers, the save lock, steps
that only go forward, what killed saves leave behind (no flax here)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias

import jax
import orbax.checkpoint as ocp

Directory: TypeAlias = str | os.PathLike[str] | ocp.CheckpointManager
LOCK_NAME = ".jema-save.lock"
STANDARD: Any = object()  # open_manager's default: one standard item per step
TEMP_MARK = ".orbax-checkpoint-tmp"  # orbax names a step's folder "<step>.orbax-checkpoint-tmp"


def open_manager(
    directory: Directory, item_handlers: Any = STANDARD
) -> contextlib.AbstractContextManager[ocp.CheckpointManager]:
    """An orbax manager of ``directory``: a caller's manager stays open, one made here saves
    synchronously and is closed on exit.

    Args:
      directory: a folder (made when missing) or an ``ocp.CheckpointManager``.
      item_handlers: the made manager's handlers: one standard item by default; None lets
        ``ocp.args.Composite`` items pick theirs (several named items per step).

    Returns:
      A context manager giving the ``ocp.CheckpointManager``.

    Raises:
      NotADirectoryError: when ``directory`` is a file.

    Example:
      >>> import tempfile
      >>> with open_manager(tempfile.mkdtemp()) as manager:
      ...     manager.all_steps()
      []
    """
    if isinstance(directory, ocp.CheckpointManager):
        return contextlib.nullcontext(directory)
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            errno.ENOTDIR, "the checkpoint folder is a file; pass a folder (new or existing)", path
        )
    if item_handlers is STANDARD:
        item_handlers = ocp.StandardCheckpointHandler()
    # Synchronous: each save is finished before save_lock is released, so the next lock holder
    # never takes a save in progress for one a killed process left.
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    return ocp.CheckpointManager(path, options=options, item_handlers=item_handlers)


def check_new_step(
    manager: ocp.CheckpointManager,
    step: int,
    noun: str = "checkpoint",
    saved: Sequence[int] | None = None,
) -> None:
    """Refuse a step already saved in ``manager``'s folder, or below a saved one; then clear
    the temporary folders earlier saves left (killed, or failed inside orbax).

    orbax would skip an existing step silently, and a lower one would never be "the latest".
    Call it holding :func:`save_lock`: the lock holder is the folder's only saver, so once the
    manager's own saves are finished every ``*.orbax-checkpoint-tmp*`` folder there is stale.

    Args:
      manager: the folder's manager.
      step: the step about to be saved.
      noun: what is saved, for the message ("checkpoint", "snapshot").
      saved: the steps the folder holds; None for every step orbax lists (posthoc passes
        only the folders that hold a snapshot).

    Raises:
      ValueError: naming the step, the folder and the remedy.

    Example:
      >>> import tempfile
      >>> with open_manager(tempfile.mkdtemp()) as manager:
      ...     check_new_step(manager, 1)
    """
    saved = sorted(manager.all_steps() if saved is None else saved)
    if step in saved:
        raise ValueError(
            f"{noun} step {step} already exists in {manager.directory}; orbax would "
            "skip it silently. Save under a new step, or delete that step first."
        )
    later = [s for s in saved if s > step]
    if later:
        raise ValueError(
            f"{noun} step {step} is below saved steps {later} in {manager.directory}: "
            "steps only go forward in a folder (restore picks the highest). When training "
            "on from an earlier checkpoint, delete those steps or save into a new folder."
        )
    manager.wait_until_finished()
    if jax.process_index() == 0:
        remove_stale_temps(os.fspath(manager.directory))


def remove_stale_temps(directory: str) -> list[str]:
    """Delete the folders orbax writes a step into before renaming it (``<step>`` followed by
    ``.orbax-checkpoint-tmp``, and whatever suffix an orbax version adds).

    Only the holder of :func:`save_lock` may call it (no save may be running there).

    Args:
      directory: a checkpoint or snapshot folder.

    Returns:
      The names removed, sorted.

    Example:
      >>> import tempfile
      >>> folder = tempfile.mkdtemp()
      >>> os.mkdir(os.path.join(folder, "7.orbax-checkpoint-tmp-1700000000"))
      >>> remove_stale_temps(folder)
      ['7.orbax-checkpoint-tmp-1700000000']
    """
    removed = []
    for entry in os.scandir(directory):
        if TEMP_MARK in entry.name and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
            removed.append(entry.name)
    return sorted(removed)


def check_savable(tree: Any, noun: str = "checkpoint") -> None:
    """Refuse what orbax cannot save before it starts (it would fail half-way): zero-size
    arrays.

    Args:
      tree: the pytree about to be saved.
      noun: what is saved, for the message.

    Raises:
      ValueError: naming every zero-size leaf by its path.

    Example:
      >>> import jax.numpy as jnp
      >>> check_savable({"w": jnp.ones(2)})
    """
    empty = sorted(
        f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if getattr(leaf, "size", 1) == 0
    )
    if empty:
        raise ValueError(
            f"orbax cannot save arrays with no elements; this {noun} holds {empty[:10]}. Drop "
            "those leaves (or give them a size) before saving; nothing was written."
        )


@contextlib.contextmanager
def save_lock(directory: str) -> Iterator[None]:
    """Hold ``directory``'s save lock (non-blocking) in the primary process of the run.

    The lock file ``.jema-save.lock`` must be a regular file (created when missing); it is
    never followed through a symlink, and a FIFO there does not block.

    Args:
      directory: an existing folder.

    Yields:
      Nothing; the lock is held until the ``with`` block ends.

    Raises:
      BlockingIOError: when another process holds the lock (is saving there).
      OSError: naming the lock file when it is a folder, a symlink, a FIFO or another
        non-regular file, or cannot be opened; or when the platform has no file locks.

    Example:
      >>> import tempfile
      >>> with save_lock(tempfile.mkdtemp()):
      ...     pass
    """
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(directory, LOCK_NAME)
    fd = _open_lock_file(path)
    try:
        _lock(fd, path, directory)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _open_lock_file(path: str) -> int:
    """``path`` opened for appending, made when missing; only a regular file is accepted."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    what = (
        "must be a regular file (jema makes it; delete whatever is there, a folder, a symlink "
        "or a FIFO, and save again)"
    )
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO, errno.EMLINK):
            raise OSError(e.errno, f"the save lock {what}", path) from e
        raise OSError(e.errno, f"cannot open the save lock: {e.strerror}", path) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"the save lock {what}", path)
    return fd


def _lock(fd: int, path: str, directory: str) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        _lock_windows(fd, path)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        raise BlockingIOError(
            e.errno,
            f"another process is saving into {directory} (it holds {path}); two runs must "
            "not share a checkpoint folder: give each its own.",
        ) from e


def _lock_windows(fd: int, path: str) -> None:
    try:
        import msvcrt
    except ImportError as e:
        raise OSError(
            errno.ENOSYS, "this platform has neither fcntl nor msvcrt file locks", path
        ) from e
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
    except OSError as e:
        raise BlockingIOError(
            errno.EAGAIN, "another process is saving (holds the lock)", path
        ) from e


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
