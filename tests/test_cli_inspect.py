"""``jema inspect`` shows a safetensors file's metadata as it shows a ``.pth``'s other keys."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import interop
from interop._files import save_safetensors

NET = {"params": {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}
EXTRA = {"epoch": 4, "acc": 0.91, "name": "run-7", "config": {"lr": 0.1, "wd": 0}}


def inspect(path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "jema", "inspect", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout.splitlines()


def test_save_checkpoint_extras_show_alike_for_pth_and_safetensors(tmp_path):
    shown = {}
    for suffix in ("pth", "safetensors"):
        path = tmp_path / f"ckpt.{suffix}"
        interop.save_checkpoint(path, net=NET, ema_net=NET, **EXTRA)
        shown[suffix] = inspect(path)[1:]
    assert shown["pth"][:6] == [
        "net: 2 tensors, 9 parameters, dtypes float32 x2",
        "ema_net: 2 tensors, 9 parameters, dtypes float32 x2",
        "epoch: 4",
        "acc: 0.91",
        "name: 'run-7'",
        "config: dict with 2 keys",
    ]
    by_order = shown["pth"][:2] + sorted(shown["pth"][2:6]) + shown["pth"][6:]
    assert shown["safetensors"] == by_order  # the format keeps no order: sorted by key


def test_any_safetensors_metadata_shows_and_jema_records_do_not(tmp_path):
    path = tmp_path / "model.safetensors"
    metadata = {"format": "pt", "step": "1200", "jema.tied": '{"head.weight": "emb.weight"}'}
    weight = np.arange(6, dtype=np.float32).reshape(3, 2)
    save_safetensors(path, {"emb.weight": weight, "head.weight": weight}, metadata)
    assert inspect(path)[1:] == [
        "state_dict: 2 tensors, 12 parameters, dtypes float32 x2",
        "format: 'pt'",
        "step: 1200",
    ]


def test_a_safetensors_file_without_metadata_shows_only_its_tensors(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_safetensors(path, {"w": np.ones(4, np.float32)}, {})
    assert inspect(path)[1:] == ["state_dict: 1 tensors, 4 parameters, dtypes float32 x1"]
