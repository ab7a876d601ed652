"""``interop.inspect_checkpoint`` and the ``jema inspect`` command line."""

from __future__ import annotations

import subprocess
import sys

import torch

import interop
from jema._app.cli import main
from tests.interop_models import TorchMLP, randomized

COMMAND = [sys.executable, "-m", "jema", "inspect"]


def test_inspect_reports_sections_counts_dtypes_and_distances(tmp_path) -> None:
    net, ema = randomized(TorchMLP(), 1), randomized(TorchMLP(), 1)
    with torch.no_grad():
        ema.layers[2].weight.mul_(1.5)
    path = tmp_path / "ckpt.pth"
    sd16 = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}
    torch.save(
        {"net": net.state_dict(), "ema_net": ema.state_dict(), "epoch": 4, "opt": sd16}, path
    )
    text = interop.inspect_checkpoint(path)
    lines = text.splitlines()
    count = sum(p.numel() for p in net.parameters())
    assert lines[1] == f"net: 6 tensors, {count:,} parameters, dtypes float32 x6"
    assert lines[2].startswith("ema_net: 6 tensors")
    assert "epoch: 4" in lines and "opt: dict with 6 keys" in lines
    start = next(i for i, line in enumerate(lines) if line.startswith("relative"))
    distances = dict(line.split() for line in lines[start + 1 :])
    assert float(distances["layers.0"]) == 0.0 and float(distances["layers.1"]) == 0.0
    w, b = net.layers[2].weight, net.layers[2].bias
    expected = 0.5 * w.norm() / torch.sqrt(w.norm() ** 2 + b.norm() ** 2)
    assert abs(float(distances["layers.2"]) - expected.item()) < 1e-3


def test_command_line_prints_the_report(tmp_path) -> None:
    path = tmp_path / "sd.pth"
    torch.save(TorchMLP().state_dict(), path)
    done = subprocess.run([*COMMAND, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "state_dict: 6 tensors" in done.stdout


def test_command_line_refuses_unsafe_and_broken_files(tmp_path, capsys) -> None:
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"net": {}, "v": torch.torch_version.TorchVersion("2.0")}, unsafe)
    done = subprocess.run([*COMMAND, str(unsafe)], capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "torch.torch_version.TorchVersion" in done.stderr
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"garbage")
    for path, message in (
        (broken, "not a readable PyTorch checkpoint"),
        (tmp_path / "missing.pth", "No such file"),
    ):
        assert main(["inspect", str(path)]) == 1
        err = capsys.readouterr().err
        assert message in err and str(path) in err


def test_keys_left_out_of_the_distance_table_are_named(tmp_path) -> None:
    net = dict(randomized(TorchMLP(), 1).state_dict())
    ema = dict(net)
    del ema["layers.1.bias"]
    ema["layers.2.weight"] = torch.zeros(2, 16)
    ema["extra.weight"] = torch.zeros(1)
    path = tmp_path / "ckpt.pth"
    torch.save({"net": net, "ema_net": ema}, path)
    lines = interop.inspect_checkpoint(path).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("relative"))
    assert [line.split()[0] for line in lines[start + 1 : start + 4]] == [
        "layers.0",
        "layers.1",
        "layers.2",
    ]
    assert lines[start + 4 :] == [
        "not compared (missing in ema_net): layers.1.bias",
        "not compared (missing in net): extra.weight",
        "not compared (shape differs): layers.2.weight (net (3, 16), ema_net (2, 16))",
    ]
