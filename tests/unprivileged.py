"""Checks that run in a forked child: as a user without root's right to write anywhere (the
suite runs as root in CI containers; file modes only mean something to a normal user), or
under limits the test process must not take on itself."""

from __future__ import annotations

import os
import pwd
import warnings
from collections.abc import Callable

import pytest


def in_child(run: Callable[[], str]) -> str:
    """``run()``'s result text, run in a forked child; an exception comes back as its repr.

    Args:
      run: what the child does; its text is sent back through a pipe.

    Returns:
      The text, or ``child failed: <exception>``.
    """
    read, write = os.pipe()
    with warnings.catch_warnings():  # JAX warns that forking a threaded process may deadlock
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            text = run()
        except BaseException as e:  # report everything to the parent
            text = f"child failed: {e!r}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


def as_normal_user(run: Callable[[], str]) -> str:
    """``run()``'s result text, run as a user without root's right to write any file.

    As root, a forked child drops to ``nobody`` (skipped when there is no such user); a normal
    user runs it in place.
    """
    if os.geteuid() != 0:
        return run()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and there is no user 'nobody' to drop to")

    def dropped() -> str:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        return run()

    return in_child(dropped)
