"""``read_checkpoint`` and ``write_checkpoint`` against ``torch`` as the oracle: a corpus that
``torch.save`` writes (every dtype, shared storages and views, non-contiguous layouts, 0-d and
empty tensors, Parameters, state_dicts with their ``_metadata``, nested containers, the legacy
format, renamed and deflated copies, a SuperGradients trainer dict) reads to the same bits and
structure as ``torch.load(weights_only=True)``; random state_dicts go both ways."""

from __future__ import annotations

import math
import shutil
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import interop
from interop._dtypes import all_dtypes, numpy_dtype, storage_name, torch_name

torch = pytest.importorskip("torch")

DTYPES = [d for d in all_dtypes() if hasattr(torch, torch_name(d))]


def _tensor_of(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of every bit pattern the seed draws (NaNs and infs included for floats)."""
    raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * dtype.itemsize)
    array = raw.astype(np.uint8)
    if dtype == np.bool_:
        array %= 2
    return torch.from_numpy(array).view(getattr(torch, torch_name(dtype))).reshape(shape)


def _bits(value) -> bytes:
    """The bytes of a tensor or array in row-major order."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1).contiguous()
        return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return np.ascontiguousarray(value).reshape(-1).view(np.uint8).tobytes()


def _same(got, want, where: str = "") -> None:
    """``got`` (read_checkpoint) is ``want`` (torch.load) with arrays for tensors."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, np.ndarray), where
        assert got.dtype == numpy_dtype(str(want.dtype)), where
        assert got.shape == tuple(want.shape), where
        if want.numel() > 1:
            assert got.strides == tuple(s * got.itemsize for s in want.stride()), where
        assert _bits(got) == _bits(want), where
        assert not got.flags.writeable, where
    elif isinstance(want, dict):
        assert type(got) is type(want) and list(got) == list(want), where
        assert getattr(got, "_metadata", None) == getattr(want, "_metadata", None), where
        for key in want:
            _same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert type(got) is (tuple if isinstance(want, torch.Size) else type(want)), where
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    else:
        assert type(got) is type(want) and got == want, where


def _tensors(value, found):
    if isinstance(value, torch.Tensor | np.ndarray):
        found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, found)
    elif isinstance(value, list | tuple):
        for item in value:
            _tensors(item, found)
    return found


def _same_ties(got, want) -> None:
    """Arrays share memory exactly where torch's tensors share a storage."""
    arrays, tensors = _tensors(got, []), _tensors(want, [])
    assert len(arrays) == len(tensors)
    for i in range(len(arrays)):
        for j in range(i):
            tied = (
                tensors[i].untyped_storage().data_ptr() == tensors[j].untyped_storage().data_ptr()
            )
            shared = arrays[i].size and arrays[j].size and np.shares_memory(arrays[i], arrays[j])
            if tensors[i].numel() and tensors[j].numel():
                assert bool(shared) == tied, (i, j)


def _corpus() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    net = net.to(memory_format=torch.channels_last)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {
        "dtypes": {torch_name(d): _tensor_of(d, (3, 5), i) for i, d in enumerate(DTYPES)},
        "views": {
            "base": base,
            "row": base[2],
            "column": base[:, 3],
            "transposed": base.t(),
            "strided": base[::2, 1::2],
            "expanded": torch.ones(4)[:, None].expand(4, 5),
            "offset_f8": _tensor_of(np.dtype(numpy_dtype("torch.float8_e4m3fn")), (6, 4))[2:],
            "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        },
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3, dtype=torch.int16),
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
        "state_dict": net.state_dict(),
        "size": torch.Size([2, 3]),
        "nested": [{"a": (1, 2.0, None)}, {b"\x00\xff", 3}, b"raw\x80", 1 + 2j],
        "numbers": [True, False, 0, -1, 2**31, -(2**63), 2**70, 0.1, float("inf"), float("nan")],
        "text": ["", "ünïcode", "x" * 300],
        "trainer": {
            "net": model.state_dict(),
            "ema_net": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "epoch": 7,
            "acc": 0.5,
            "scaler_state_dict": None,
        },
    }


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "ckpt_best.pth"
    torch.save(_corpus(), path)
    return path


def _check(path) -> None:
    want = torch.load(path, weights_only=True)
    got = interop.read_checkpoint(path)
    _same(got, want)
    _same_ties(got, want)


def test_the_corpus_reads_as_torch_loads_it(corpus_file):
    _check(corpus_file)


def test_views_of_one_storage_are_views_of_one_buffer(corpus_file):
    views = interop.read_checkpoint(corpus_file)["views"]
    assert views["row"].base is views["base"].base or np.shares_memory(views["row"], views["base"])
    assert views["transposed"].strides == (4, 24)
    assert views["expanded"].strides == (4, 0)


def test_a_renamed_copy_reads_the_same(corpus_file, tmp_path):
    copy = tmp_path / "renamed.pt"
    shutil.copy(corpus_file, copy)
    with zipfile.ZipFile(copy) as archive:
        assert archive.namelist()[0] == "ckpt_best/data.pkl"  # the folder keeps its first name
    _check(copy)


def test_a_deflated_copy_reads_the_same(corpus_file, tmp_path):
    copy = tmp_path / "deflated.pth"
    with zipfile.ZipFile(corpus_file) as src, zipfile.ZipFile(copy, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED)
    _check(copy)


def test_the_legacy_format_reads_the_same(tmp_path):
    corpus = _corpus()
    path = tmp_path / "legacy.pth"
    classic = {k: v for k, v in corpus["dtypes"].items() if not k.startswith(("uint", "float8"))}
    classic["uint8"] = corpus["dtypes"]["uint8"]  # the legacy format has no new dtypes
    corpus["dtypes"] = classic
    del corpus["views"]["offset_f8"]
    torch.save(corpus, path, _use_new_zipfile_serialization=False)
    _check(path)


def test_what_write_checkpoint_writes_of_the_corpus_torch_loads_bit_exact(corpus_file, tmp_path):
    read = interop.read_checkpoint(corpus_file)
    path = tmp_path / "again.pth"
    interop.write_checkpoint(path, read)
    for mmap in (False, True):
        want = torch.load(corpus_file, weights_only=True)
        _same(read, torch.load(path, weights_only=True, mmap=mmap))
        _same_ties(interop.read_checkpoint(path), want)


def _array(draw, dtype: np.dtype) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    size = dtype.itemsize * int(np.prod(shape))
    raw = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), np.uint8).copy()
    if dtype == np.bool_:
        raw %= 2
    array = raw.view(dtype).reshape(shape)
    return array.T if array.ndim >= 2 and draw(st.booleans()) else array


@st.composite
def state_dicts(draw):
    count = draw(st.integers(1, 4))
    arrays = [_array(draw, draw(st.sampled_from(DTYPES))) for _ in range(count)]
    keys = draw(st.lists(st.text("ab.", min_size=1, max_size=4), min_size=count + 1,
                         max_size=count + 1, unique=True))  # fmt: skip
    out = OrderedDict(zip(keys, arrays, strict=False))
    out[keys[-1]] = arrays[0]  # one array under two keys: one storage
    return out


@given(state_dicts(), st.booleans())
def test_what_write_checkpoint_writes_torch_loads_bit_exact(tmp_path_factory, sd, mmap):
    path = tmp_path_factory.mktemp("w") / "ckpt.pth"
    interop.write_checkpoint(path, {"net": sd, "epoch": 1})
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert loaded["epoch"] == 1 and list(loaded["net"]) == list(sd)
    for key, array in sd.items():
        tensor = loaded["net"][key]
        assert tensor.dtype == getattr(torch, torch_name(array.dtype)), key
        assert tuple(tensor.shape) == array.shape and _bits(tensor) == _bits(array), key
    first, tie = loaded["net"][next(iter(sd))], loaded["net"][next(reversed(sd))]
    assert first.untyped_storage().data_ptr() == tie.untyped_storage().data_ptr()


def _to_torch(array: np.ndarray) -> torch.Tensor:
    """The tensor viewing ``array``'s memory (ml_dtypes' arrays through same-width integers)."""
    carrier = array.dtype if array.dtype.isbuiltin == 1 else np.dtype(f"u{array.itemsize}")
    return torch.from_numpy(array.view(carrier)).view(getattr(torch, torch_name(array.dtype)))


@given(state_dicts(), st.booleans())
def test_what_torch_save_writes_reads_bit_exact(tmp_path_factory, sd, legacy):
    path = tmp_path_factory.mktemp("r") / "ckpt.pth"
    tensors: dict[int, torch.Tensor] = {}  # a tie stays one tensor, as in a state_dict
    state_dict = OrderedDict((k, tensors.setdefault(id(a), _to_torch(a))) for k, a in sd.items())
    new = any(storage_name(a.dtype) is None for a in sd.values())  # legacy: classic dtypes only
    torch.save(state_dict, path, _use_new_zipfile_serialization=not legacy or new)
    _check(path)


@st.composite
def views_of_one_buffer(draw):
    dtype = draw(st.sampled_from(DTYPES))
    base = _array(draw, dtype).reshape(-1)
    base = np.resize(base, 24) if base.size else np.zeros(24, dtype)
    grid = base.reshape(4, 6)
    views = {"base": grid}
    for i in range(draw(st.integers(1, 4))):
        start, stop = draw(st.integers(0, 3)), draw(st.integers(1, 4))
        step = draw(st.sampled_from([1, 2, -1]))
        view = grid[start : start + stop, ::step]
        view = draw(st.sampled_from([view, view.T, np.broadcast_to(view[:1], (3, view.shape[1]))]))
        views[f"v{i}"] = view
    return views


@given(views_of_one_buffer(), st.booleans())
def test_views_of_one_buffer_are_written_as_torch_loads_them(tmp_path_factory, views, mmap):
    path = tmp_path_factory.mktemp("v") / "views.pth"
    interop.write_checkpoint(path, views)
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    back = interop.read_checkpoint(path)
    for key, array in views.items():
        assert _bits(loaded[key]) == _bits(array) and _bits(back[key]) == _bits(array), key
        assert tuple(loaded[key].shape) == array.shape == back[key].shape, key
