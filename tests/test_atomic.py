"""Saves onto targets that are not regular files: written in place, never replaced."""

from __future__ import annotations

import os
import socket
import stat
import threading

import numpy as np
import pytest

from interop._files import save_safetensors


def read_fifo(path, into):
    with open(path, "rb") as f:
        into.append(f.read())


@pytest.mark.parametrize("through_symlink", [False, True])
def test_a_fifo_target_is_written_in_place_and_stays_a_fifo(tmp_path, through_symlink):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    regular = tmp_path / "regular.safetensors"
    save_safetensors(regular, arrays, {"epoch": "1"})
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = fifo
    if through_symlink:
        target = tmp_path / "link"
        os.symlink(fifo, target)
    received: list[bytes] = []
    reader = threading.Thread(target=read_fifo, args=(fifo, received), daemon=True)
    reader.start()
    save_safetensors(target, arrays, {"epoch": "1"})
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert received == [regular.read_bytes()]
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["regular.safetensors", "pipe"] + (["link"] if through_symlink else [])
    )


def test_saving_to_dev_null_leaves_the_device_a_device():
    before = os.stat("/dev/null")
    save_safetensors("/dev/null", {"w": np.ones(2, np.float32)}, {})
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert not [name for name in os.listdir("/dev") if name.startswith(".null.")]


def test_a_socket_target_is_refused_naming_it(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(os.fspath(path))
        with pytest.raises(OSError, match=r"socket, not a file.*sock"):
            save_safetensors(path, {"w": np.ones(2, np.float32)}, {})
        assert stat.S_ISSOCK(os.stat(path).st_mode) and os.listdir(tmp_path) == ["sock"]
