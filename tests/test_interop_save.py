"""``interop.save_checkpoint`` on awkward targets: read-only files, symlinks, leftovers of a
killed save, long names, unwritable folders and extras that would not load back."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import interop
from interop._files import _temp_prefix
from tests.unprivileged import as_normal_user

NET = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}}


def _outcome(save) -> str:
    try:
        save()
    except OSError as e:
        return f"{type(e).__name__} {e.filename}"
    return "saved"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_read_only_file_is_refused_as_torch_save_refuses_it(shared_folder, suffix) -> None:
    path = shared_folder / f"ckpt.{suffix}"

    def attempt() -> str:
        path.write_bytes(b"old")
        path.chmod(0o444)
        ours = _outcome(lambda: interop.save_checkpoint(path, net=NET))
        try:
            torch.save({}, path)
            theirs = "saved"
        except (OSError, RuntimeError):  # torch's zip writer says RuntimeError
            theirs = "refused"
        return f"{ours} | torch.save {theirs} | {path.read_bytes()!r}"

    assert as_normal_user(attempt) == f"PermissionError {path} | torch.save refused | b'old'"
    assert sorted(p.name for p in shared_folder.iterdir()) == [path.name]


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_symlink_is_written_through_to_its_target(tmp_path, suffix) -> None:
    target, link = tmp_path / f"target.{suffix}", tmp_path / f"link.{suffix}"
    target.write_bytes(b"old")
    link.symlink_to(target.name)
    interop.save_checkpoint(link, net=NET, epoch=1)
    assert link.is_symlink() and os.readlink(link) == target.name
    loaded = interop.load_checkpoint(target, NET)
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], NET["params"]["fc"]["kernel"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, link.name])


def test_leftovers_of_a_killed_save_are_removed_by_the_next(tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    prefix = _temp_prefix(path.name)
    assert prefix.startswith(".ckpt.pth.") and len(prefix) == len(".ckpt.pth.") + 17
    stale = [tmp_path / f"{prefix}{i:016x}.tmp" for i in range(2)]
    other = tmp_path / f"{_temp_prefix('other.pth')}0000000000000000.tmp"
    for p in (*stale, other):
        p.write_bytes(b"half")
    interop.save_checkpoint(path, net=NET)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name])


@pytest.mark.parametrize("name", ["a" * 250 + ".pth", "é" * 123 + ".pth"])
def test_temp_names_fit_the_file_name_limit_for_long_targets(tmp_path, name) -> None:
    assert len(os.fsencode(name)) <= 255
    prefix = _temp_prefix(name)
    assert len(os.fsencode(prefix)) + len("0123456789abcdef.tmp") <= 139
    assert _temp_prefix(name[:-4] + ".bin") != prefix  # same first 100 bytes, other file
    interop.save_checkpoint(tmp_path / name, net=NET)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_errors_name_the_users_path_not_the_temp_file(tmp_path) -> None:
    path = tmp_path / "missing" / "ckpt.pth"
    with pytest.raises(FileNotFoundError) as e:
        interop.save_checkpoint(path, net=NET)
    assert e.value.filename == str(path)


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_an_unwritable_folder_is_an_os_error_naming_the_path(shared_folder, suffix) -> None:
    path = shared_folder / f"ckpt.{suffix}"

    def attempt() -> str:
        shared_folder.chmod(0o555)
        try:
            return _outcome(lambda: interop.save_checkpoint(path, net=NET))
        finally:
            shared_folder.chmod(0o755)

    assert as_normal_user(attempt) == f"PermissionError {path}"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"opt": object()}, "cannot store ['opt'] (a object): a torch.save file read with"),
        ({"ok": 1, "cfg": {"f": len}}, "cannot store ['cfg']['f'] (a builtin_function_or"),
        ({"sched": [1, (2, lambda: 3)]}, "cannot store ['sched'][1][1] (a function)"),
    ],
)
def test_extras_that_would_not_load_back_are_refused_before_writing(
    tmp_path, extra, message
) -> None:
    path = tmp_path / "ckpt.pth"
    with pytest.raises(TypeError) as e:
        interop.save_checkpoint(path, net=NET, **extra)
    assert str(e.value).startswith(message)
    assert "holds arrays, dicts, lists, tuples, sets, str, bytes, int, float" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_tensor_extras_are_saved_whole_after_the_check(tmp_path) -> None:
    big = {"state": {0: {"exp_avg": torch.ones(1000, 1000)}}, "param_groups": [{"lr": 0.1}]}
    interop.save_checkpoint(tmp_path / "ckpt.pth", net=NET, optimizer=big)
    back = torch.load(tmp_path / "ckpt.pth", weights_only=True)["optimizer"]
    assert back["state"][0]["exp_avg"].sum().item() == 1_000_000.0


class _Renamed(torch.nn.Module):
    """``fc`` under another name, so that saving needs a rename rule."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(2, 3)


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_save_takes_the_loaders_matching_options_and_they_are_not_entries(tmp_path, suffix) -> None:
    path = tmp_path / f"ckpt.{suffix}"
    with pytest.raises(ValueError, match="missing:\n  head.bias\n  head.weight"):
        interop.save_checkpoint(path, net=NET, torch_template=_Renamed())
    interop.save_checkpoint(
        path, net=NET, ema_net=NET, torch_template=_Renamed(), rename={r"^head\.": "fc."}, epoch=2
    )
    back = interop.load_checkpoint(path, NET, rename={r"^head\.": "fc."})
    np.testing.assert_array_equal(back["params"]["fc"]["kernel"], NET["params"]["fc"]["kernel"])
    if suffix == "pth":
        saved = torch.load(path, weights_only=True)
        assert list(saved) == ["net", "ema_net", "epoch"]
        assert list(saved["net"]) == ["head.weight", "head.bias"]
    cast = interop.save_checkpoint(
        path, net=NET, torch_template=_Renamed().double(), rename={"head": "fc"}, cast=True
    )
    assert cast is None
    reloaded = interop.load_checkpoint(path, NET, rename={"head": "fc"}, cast=True)
    np.testing.assert_array_equal(reloaded["params"]["fc"]["bias"], NET["params"]["fc"]["bias"])


def test_a_non_strict_save_writes_the_templates_values_and_returns_the_reports(tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    template = _Renamed()
    reports = interop.save_checkpoint(
        path, net=NET, ema_net=NET, torch_template=template, strict=False
    )
    assert list(reports) == ["net", "ema_net"]
    assert reports["net"].missing == ("head.bias", "head.weight")
    assert reports["net"].unexpected == ("params/fc/bias", "params/fc/kernel")
    saved = torch.load(path, weights_only=True)
    assert torch.equal(saved["ema_net"]["head.weight"], template.head.weight.detach())


@pytest.mark.parametrize("name", ["which", "prefix", "template"])
def test_an_extra_named_like_a_load_option_is_refused(tmp_path, name) -> None:
    with pytest.raises(ValueError, match=f"save_checkpoint got {name}: options of load_checkpoint"):
        interop.save_checkpoint(tmp_path / "ckpt.pth", net=NET, **{name: "teacher."})
    assert list(tmp_path.iterdir()) == []


def test_ema_net_that_is_net_is_converted_once_and_stored_once(tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    interop.save_checkpoint(path, net=NET, ema_net=NET)
    saved = torch.load(path, weights_only=True)
    assert saved["net"]["fc.weight"].data_ptr() == saved["ema_net"]["fc.weight"].data_ptr()
    assert torch.equal(saved["ema_net"]["fc.weight"], torch.ones(3, 2))


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_leaves_that_are_any_numpy_view_are_written_exactly(tmp_path, suffix) -> None:
    """Kernels go to a ``.pth`` file as PyTorch-layout views of their memory (strided tensors,
    no transposing copy); views of one buffer share one storage, as torch.save writes views of
    one tensor; reversed views are copied first; every file holds exactly the values."""
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    net = {
        "params": {
            "fc": {"kernel": base[:, ::2], "bias": np.arange(3, dtype=np.float32)[::-1]},
            "conv": {"kernel": np.broadcast_to(base[:1, :4], (3, 3, 2, 4))},
            "head": {"kernel": base},
        }
    }
    path = tmp_path / f"ckpt.{suffix}"
    interop.save_checkpoint(path, net=net)
    back = interop.load_checkpoint(path, net)
    for module, leaves in net["params"].items():
        for leaf, want in leaves.items():
            np.testing.assert_array_equal(back["params"][module][leaf], want)
    if suffix == "pth":
        saved = torch.load(path, weights_only=True)["net"]
        contiguous = interop.flax_to_torch(net)
        assert all(torch.equal(saved[k], contiguous[k]) for k in contiguous)
        assert saved["head.weight"].stride() == (1, 6)  # the kernel's own memory, transposed
        assert saved["fc.weight"].stride() == (2, 6)  # views of head's memory: one storage
        assert saved["conv.weight"].stride() == (1, 0, 0, 0)  # broadcast, as torch's expand
        storages = {saved[k].untyped_storage().data_ptr() for k in ("head.weight", "fc.weight")}
        assert len(storages) == 1 and saved["fc.bias"].is_contiguous()
