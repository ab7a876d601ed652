"""Checkpoint files: SG layout, sections, prefixes, safety, safetensors, atomic writes."""

from __future__ import annotations

import os
import resource
import signal
import stat
import threading

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn as tnn

import interop
from interop._schema import read_checkpoint
from tests.interop_models import LinenCNN, LinenMLP, TorchCNN, TorchMLP, randomized
from tests.unprivileged import in_child

X_CNN = np.zeros((1, 8, 8, 3), np.float32)
X_MLP = np.zeros((1, 4), np.float32)


def _template(module, x):
    return jax.eval_shape(module.init, jax.random.key(0), x)


CNN_T = _template(LinenCNN(), X_CNN)
MLP_T = _template(LinenMLP(), X_MLP)


class TorchKD(tnn.Module):
    """A KD module as SuperGradients saves it: ``student.*`` and ``teacher.*`` keys."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = TorchMLP(), TorchCNN()


class TorchNetHead(tnn.Module):
    """A model with a submodule called ``net``, like SuperGradients' section."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.head = tnn.Linear(4, 8), tnn.Linear(8, 3)


def _abstract(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, np.float32)


NET_HEAD_T = {
    "params": {
        "net": {"kernel": _abstract(4, 8), "bias": _abstract(8)},
        "head": {"kernel": _abstract(8, 3), "bias": _abstract(3)},
    }
}


def _same(flax_tree, state_dict, template_module) -> None:
    back = interop.flax_to_torch(flax_tree, template_module)
    assert all(torch.equal(back[k], v) for k, v in state_dict.items())


@pytest.fixture
def models():
    return randomized(TorchMLP(), 1), randomized(TorchMLP(), 2)


def test_auto_takes_ema_net_then_net(tmp_path, models) -> None:
    net, ema = models
    path = tmp_path / "ckpt.pth"
    torch.save({"net": net.state_dict(), "ema_net": ema.state_dict(), "epoch": 3}, path)
    _same(interop.load_checkpoint(path, MLP_T), ema.state_dict(), net)
    _same(interop.load_checkpoint(path, MLP_T, which="net"), net.state_dict(), net)
    torch.save({"net": net.state_dict(), "acc": 0.5}, path)
    _same(interop.load_checkpoint(path, MLP_T), net.state_dict(), net)
    with pytest.raises(ValueError, match=r"no 'ema_net'; its keys are \['acc', 'net'\]"):
        interop.load_checkpoint(path, MLP_T, which="ema_net")
    with pytest.raises(ValueError, match="which must be"):
        interop.load_checkpoint(path, MLP_T, which="best")


def test_bare_state_dict_and_module_prefix(tmp_path, models) -> None:
    net, _ = models
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    _same(interop.load_checkpoint(path, MLP_T), net.state_dict(), net)
    with pytest.raises(ValueError, match="bare state_dict with no 'ema_net'"):
        interop.load_checkpoint(path, MLP_T, which="ema_net")


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_bare_state_dict_with_a_net_submodule_is_not_a_section(tmp_path, suffix) -> None:
    model = randomized(TorchNetHead(), 3)
    path = tmp_path / f"bare.{suffix}"
    state_dict = dict(model.state_dict())
    if suffix == "pth":
        torch.save(state_dict, path)
    else:
        safetensors.torch.save_file(state_dict, path)
    _same(interop.load_checkpoint(path, NET_HEAD_T), state_dict, model)
    lines = interop.inspect_checkpoint(path).splitlines()
    assert lines[1:] == ["state_dict: 4 tensors, 67 parameters, dtypes float32 x4"]


class TorchOnlyNet(tnn.Module):
    """A model whose only child is ``self.net``: every key starts with ``net.``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tnn.Sequential(tnn.Linear(4, 8), tnn.BatchNorm1d(8))


ONLY_NET_T = {
    "params": {
        "net": {
            "layers_0": {"kernel": _abstract(4, 8), "bias": _abstract(8)},
            "layers_1": {"scale": _abstract(8), "bias": _abstract(8)},
        }
    },
    "batch_stats": {"net": {"layers_1": {"mean": _abstract(8), "var": _abstract(8)}}},
}


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_bare_state_dict_whose_keys_all_start_with_net(tmp_path, suffix) -> None:
    model = randomized(TorchOnlyNet(), 4)
    state_dict = dict(model.state_dict())
    assert all(k.startswith("net.") for k in state_dict)
    path = tmp_path / f"bare.{suffix}"
    if suffix == "pth":
        torch.save(state_dict, path)
    else:
        safetensors.torch.save_file(state_dict, path)
    _same(interop.load_checkpoint(path, ONLY_NET_T), state_dict, model)
    assert interop.inspect_checkpoint(path).splitlines()[1:] == [
        "state_dict: 7 tensors, 73 parameters, dtypes float32 x6, int64 x1"
    ]


def test_our_safetensors_with_net_alone_reads_as_sections(tmp_path, models) -> None:
    net, _ = models
    path = tmp_path / "ckpt.safetensors"
    net_vars = interop.torch_to_flax(net.state_dict(), MLP_T)
    interop.save_checkpoint(path, net=net_vars, epoch=1)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"epoch": "1", "jema.sections": "net"}
    assert list(read_checkpoint(path)) == ["net"]
    _same(interop.load_checkpoint(path, MLP_T), net.state_dict(), net)
    _same(interop.load_checkpoint(path, MLP_T, which="net"), net.state_dict(), net)
    assert interop.inspect_checkpoint(path).splitlines()[1].startswith("net: 6 tensors")
    with pytest.raises(ValueError, match="reserved"):
        interop.save_checkpoint(path, net=net_vars, **{"jema.sections": "x"})


def test_third_party_flat_net_file_loads_with_prefix(tmp_path, models) -> None:
    net, _ = models
    path = tmp_path / "flat.safetensors"
    safetensors.torch.save_file({f"net.{k}": v for k, v in net.state_dict().items()}, path)
    with pytest.raises(ValueError, match=r"every key starts with 'net\.'.*prefix='net\.'"):
        interop.load_checkpoint(path, MLP_T)
    _same(interop.load_checkpoint(path, MLP_T, prefix="net."), net.state_dict(), net)
    assert interop.inspect_checkpoint(path).splitlines()[1].startswith("state_dict: 6 tensors")


def test_safetensors_with_both_prefixes_and_no_marker_is_sections(tmp_path, models) -> None:
    net, ema = models
    path = tmp_path / "sg.safetensors"
    flat = {f"net.{k}": v for k, v in net.state_dict().items()}
    flat |= {f"ema_net.{k}": v for k, v in ema.state_dict().items()}
    safetensors.torch.save_file(flat, path)
    _same(interop.load_checkpoint(path, MLP_T), ema.state_dict(), net)
    _same(interop.load_checkpoint(path, MLP_T, which="net"), net.state_dict(), net)


def test_bare_state_dict_with_a_parameter_named_net(tmp_path) -> None:
    state_dict = {"net": torch.randn(3), "head.weight": torch.randn(2, 3)}
    path = tmp_path / "bare.pth"
    torch.save(state_dict, path)
    template = {"params": {"net": _abstract(3), "head": {"kernel": _abstract(3, 2)}}}
    loaded = interop.load_checkpoint(path, template)
    np.testing.assert_array_equal(loaded["params"]["net"], state_dict["net"].numpy())
    assert interop.inspect_checkpoint(path).splitlines()[1].startswith("state_dict: 2 tensors")


def test_save_then_load_round_trip_with_extras(tmp_path, models) -> None:
    net, ema = models
    net_vars = interop.torch_to_flax(net.state_dict(), MLP_T)
    ema_vars = interop.torch_to_flax(ema.state_dict(), MLP_T)
    path = tmp_path / "out.pth"
    interop.save_checkpoint(
        path, net=net_vars, ema_net=ema_vars, torch_template=net, epoch=7, acc=np.float32(0.25)
    )
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["net", "ema_net", "epoch", "acc"]
    assert raw["epoch"] == 7 and raw["acc"] == 0.25
    fresh = TorchMLP()
    fresh.load_state_dict(raw["ema_net"], strict=True)
    _same(interop.load_checkpoint(path, MLP_T), ema.state_dict(), net)
    assert not [p for p in os.listdir(tmp_path) if p != "out.pth"]


def test_kd_checkpoint_save_and_prefix_load(tmp_path) -> None:
    kd = randomized(TorchKD(), 5)
    sd = kd.state_dict()
    student = interop.torch_to_flax(sd, MLP_T, prefix="student.")
    teacher = interop.torch_to_flax(sd, CNN_T, prefix="teacher.")
    path = tmp_path / "kd.pth"
    both = {"student": student, "teacher": teacher}
    interop.save_checkpoint(path, net=both, ema_net=both, torch_template=kd)
    TorchKD().load_state_dict(torch.load(path, weights_only=True)["ema_net"], strict=True)
    loaded = interop.load_checkpoint(path, CNN_T, prefix="teacher.")
    _same(loaded, kd.teacher.state_dict(), kd.teacher)
    assert interop.load_checkpoint(path, both).keys() == {"student", "teacher"}
    with pytest.raises(ValueError, match=r"prefix 'tutor\.'.*\['student\.', 'teacher\.'\]"):
        interop.load_checkpoint(path, CNN_T, prefix="tutor.")


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_would_run_code_is_refused(tmp_path, models) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"net": models[0].state_dict(), "x": _RunsCode(str(marker))}, path)
    with pytest.raises(ValueError, match=rf"{path} needs globals .*io\.open"):
        interop.load_checkpoint(path, MLP_T)
    assert not marker.exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_numpy_scalars_are_read_as_data(tmp_path, models, zipped) -> None:
    """SG's ``acc`` is often a numpy scalar: decoded by our own code, nothing imported."""
    path = tmp_path / "np.pth"
    ckpt = {"net": models[0].state_dict(), "acc": np.float32(0.5), "epoch": np.int64(3)}
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipped)
    read = interop.read_checkpoint(path)
    assert type(read["acc"]) is np.float32 and read["acc"] == np.float32(0.5)
    assert type(read["epoch"]) is np.int64 and read["epoch"] == 3
    _same(interop.load_checkpoint(path, MLP_T), models[0].state_dict(), models[0])


def _write(path, content: bytes) -> None:
    with open(path, "wb") as f:
        f.write(content)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a readable PyTorch checkpoint"),
        (b"hello, world", "not a readable PyTorch checkpoint"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("list", "holds a list, not a checkpoint dict"),
        ("no-net", r"has no 'net' or 'ema_net' and is not a state_dict; keys: \['epoch'\]"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", "not a readable safetensors file"),
    ],
)
def test_bad_files_give_errors_naming_the_file(tmp_path, content, message) -> None:
    path = tmp_path / "bad.pth"
    if content == "truncated":
        torch.save({"net": TorchMLP().state_dict()}, path)
        _write(path, path.read_bytes()[:300])
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "no-net":
        torch.save({"epoch": 1}, path)
    else:
        _write(path, content)
    with pytest.raises(ValueError, match=message) as e:
        interop.load_checkpoint(path, MLP_T)
    assert str(path) in str(e.value)


def test_missing_file_is_an_os_error_naming_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        interop.load_checkpoint(tmp_path / "nope.pth", MLP_T)


def test_safetensors_save_and_load(tmp_path, models) -> None:
    net, ema = models
    path = tmp_path / "ckpt.safetensors"
    net_vars = interop.torch_to_flax(net.state_dict(), MLP_T)
    ema_vars = interop.torch_to_flax(ema.state_dict(), MLP_T)
    interop.save_checkpoint(path, net=net_vars, ema_net=ema_vars, epoch=2)
    flat = safetensors.torch.load_file(path)
    assert sorted(flat) == sorted(
        [f"net.{k}" for k in net.state_dict()] + [f"ema_net.{k}" for k in net.state_dict()]
    )
    _same(interop.load_checkpoint(path, MLP_T), ema.state_dict(), net)
    _same(interop.load_checkpoint(path, MLP_T, which="net"), net.state_dict(), net)
    lines = interop.inspect_checkpoint(path).splitlines()
    assert lines[1].startswith("net: 6 tensors") and lines[2].startswith("ema_net: 6 tensors")
    bare = tmp_path / "bare.safetensors"
    safetensors.torch.save_file(dict(net.state_dict()), bare)
    _same(interop.load_checkpoint(bare, MLP_T), net.state_dict(), net)
    with pytest.raises(TypeError, match="JSON"):
        interop.save_checkpoint(path, net=net_vars, opt=object())


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_saved_files_get_the_mode_open_would_give(tmp_path, models, umask, suffix) -> None:
    net_vars = interop.torch_to_flax(models[0].state_dict(), MLP_T)
    path = tmp_path / f"ckpt.{suffix}"
    old = os.umask(umask)
    try:
        _write(tmp_path / "plain", b"")
        interop.save_checkpoint(path, net=net_vars)
        assert _mode(path) == _mode(tmp_path / "plain") == 0o666 & ~umask
        os.chmod(path, 0o640)
        interop.save_checkpoint(path, net=net_vars)
        assert _mode(path) == 0o640
    finally:
        os.umask(old)


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="folders can be synced on POSIX")
def test_file_is_synced_before_the_rename_and_folder_after(tmp_path, models, monkeypatch) -> None:
    net_vars = interop.torch_to_flax(models[0].state_dict(), MLP_T)
    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", lambda *a: events.append("rename") or replace(*a))
    interop.save_checkpoint(tmp_path / "ckpt.pth", net=net_vars)
    assert events == ["fsync file", "rename", "fsync folder"]


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_real_write_limit_is_an_os_error_naming_the_path(tmp_path, models, suffix) -> None:
    """No monkeypatching: a forked child may write at most 4 KiB per file (RLIMIT_FSIZE), as on
    a disk that fills up mid-save; torch's zip writer then fails inside C++."""
    path = tmp_path / f"ckpt.{suffix}"
    small = interop.torch_to_flax(models[0].state_dict(), MLP_T)
    interop.save_checkpoint(path, net=small)
    before = path.read_bytes()
    big = {"params": {"w": np.ones((64, 1024), np.float32)}}

    def save_under_a_limit() -> str:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            interop.save_checkpoint(path, net=big)
        except OSError as e:
            return f"{e.filename}|{e}"
        return "saved|"

    outcome = in_child(save_under_a_limit)
    filename, _, message = outcome.partition("|")
    assert filename == str(path), outcome
    assert "File too large" in message or "torch.save could not write the file" in message
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def _read_fifo(path, into):
    with open(path, "rb") as f:
        into.append(f.read())


def test_a_pth_checkpoint_streams_into_a_fifo_as_torch_save_would(tmp_path):
    net = {"params": {"fc": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=_read_fifo, args=(fifo, received))
    reader.start()
    interop.save_checkpoint(fifo, net=net, epoch=4)
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["pipe.pth"]
    copy = tmp_path / "copy.pth"
    copy.write_bytes(received[0])
    loaded = torch.load(copy, weights_only=True)
    assert loaded["epoch"] == 4
    assert loaded["net"]["fc.weight"].tolist() == net["params"]["fc"]["kernel"].T.tolist()
