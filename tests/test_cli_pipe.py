"""``jema ... | head -1``: a reader closing the pipe early ends the command quietly, status 0."""

import os
import subprocess
import sys

import numpy as np
import pytest

from interop._files import save_safetensors

COMMAND = [sys.executable, "-m", "jema"]


@pytest.fixture
def checkpoint(tmp_path) -> str:
    """A safetensors file with 3000 layers in net and ema_net: ~100 KB of report, past a pipe's
    buffer, so the command is still writing when the reader goes."""
    tensors = {
        f"{section}.layer{i:04d}.weight": np.full(2, i + 1 + (section == "ema_net"), np.float32)
        for section in ("net", "ema_net")
        for i in range(3000)
    }
    path = str(tmp_path / "wide.safetensors")
    save_safetensors(path, tensors, {"jema.sections": "net,ema_net"})
    return path


@pytest.mark.parametrize(
    "args",
    [["--version"], ["--help"], ["demo", "--help"], ["bench", "--help"], ["inspect", "{ckpt}"]],
)
def test_a_pipe_closed_before_the_first_write_is_no_traceback(args, checkpoint):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before jema writes a byte
    try:
        done = subprocess.run(
            [*COMMAND, *(a.format(ckpt=checkpoint) for a in args)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_reader_that_takes_one_line_of_a_long_report_then_leaves(checkpoint):
    with subprocess.Popen(
        [*COMMAND, "inspect", checkpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        first = process.stdout.readline()
        process.stdout.close()  # as head -1 does
        errors = process.stderr.read()
        status = process.wait()
    assert first.decode().startswith(f"{checkpoint} (")
    assert (status, errors) == (0, b"")


def test_the_whole_report_still_arrives_through_an_open_pipe(checkpoint):
    done = subprocess.run(
        [*COMMAND, "inspect", checkpoint], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[1:3] == [
        "net: 3000 tensors, 6,000 parameters, dtypes float32 x3000",
        "ema_net: 3000 tensors, 6,000 parameters, dtypes float32 x3000",
    ]
    assert len(lines) == 3004 and lines[-1].split() == ["layer2999", f"{1 / 3000:.3e}"]
