"""``.pth`` files for the numpy reader and writer's tests, and the checks that compare them.

Three kinds of files:

- the corpus (``build_corpus``, needs torch): ``torch.save`` files of every dtype, shared
  storages, non-row-major layouts, Parameters, a module's state_dict, nested containers, an
  SG trainer-style dict, the legacy format, a renamed, a deflated and a big-endian file;
  ``torch.load(weights_only=True)`` is their oracle (``from_torch``);
- the fixtures (``FIXTURES``): small files torch 2.13 wrote into ``tests/data/pth`` from seeded
  numpy recipes, so that without torch the expected contents are recomputed here (regenerate
  them with ``python -m tests.pth_corpus``);
- crafted files (``craft_pickle``, ``write_zip``, ``crafted_pth``), built without torch from
  pickle opcodes, for hostile inputs and their honest twins.

Arrays are compared by dtype, shape, strides in elements and bytes (``assert_same``), and
storage sharing by ``np.shares_memory`` of every pair (``assert_same_sharing``).
"""

from __future__ import annotations

import collections
import math
import os
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

FIXTURE_DIR = pathlib.Path(__file__).parent / "data" / "pth"

# Every dtype numpy (with ml_dtypes) and torch both have, by torch's name.
DTYPES = {
    "bool": np.dtype(np.bool_),
    "uint8": np.dtype(np.uint8),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
# The dtypes torch writes as UntypedStorage plus a dtype global (``_rebuild_tensor_v3``).
NEW_DTYPES = ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
# Typed storage classes of the classic dtypes, as a torch.save pickle names them.
STORAGES = {
    "bool": "BoolStorage",
    "uint8": "ByteStorage",
    "int8": "CharStorage",
    "int16": "ShortStorage",
    "int32": "IntStorage",
    "int64": "LongStorage",
    "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage",
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "complex64": "ComplexFloatStorage",
    "complex128": "ComplexDoubleStorage",
}
ML_DTYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")  # numpy has them through ml_dtypes
MARKER_NAME = "pth_corpus_ran"  # a file a hostile pickle's code would create


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous array of ``dtype``: random bits for integers and float8 (NaNs included),
    normal values for the other floats, 0/1 for bool."""
    dtype = np.dtype(dtype)
    n = math.prod(shape)
    if dtype == np.bool_:
        return rng.integers(0, 2, n).astype(np.bool_).reshape(shape)
    if dtype.kind in "iu" or dtype.itemsize == 1:
        bits = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)
        return bits.view(dtype).reshape(shape).copy()
    if dtype.kind == "c":
        part = rng.standard_normal((n, 2)).astype(np.float64)
        return (part[:, 0] + 1j * part[:, 1]).astype(dtype).reshape(shape)
    return rng.standard_normal(n).astype(dtype).reshape(shape)


# ---- the fixtures: seeded numpy recipes that torch 2.13 wrote into tests/data/pth ----


def _state_dict(
    entries: dict[str, np.ndarray], metadata: dict[str, Any]
) -> collections.OrderedDict:
    """An OrderedDict with ``_metadata``, as ``nn.Module.state_dict()`` returns."""
    out = collections.OrderedDict(entries)
    out._metadata = collections.OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


def _tiny_net(rng: np.random.Generator) -> collections.OrderedDict:
    conv = random_array(rng, np.float32, (4, 3, 3, 2)).transpose(0, 3, 1, 2)  # channels_last
    return _state_dict(
        {
            "conv.weight": conv,
            "conv.bias": random_array(rng, np.float32, (4,)),
            "bn.weight": random_array(rng, np.float32, (4,)),
            "bn.bias": random_array(rng, np.float32, (4,)),
            "bn.running_mean": random_array(rng, np.float32, (4,)),
            "bn.running_var": np.abs(random_array(rng, np.float32, (4,))),
            "bn.num_batches_tracked": np.array(7, np.int64),
            "fc.weight": random_array(rng, np.float32, (3, 4)),
            "fc.bias": random_array(rng, np.float32, (3,)),
        },
        {"": {"version": 1}, "conv": {"version": 1}, "bn": {"version": 2}, "fc": {"version": 1}},
    )


def sg_tiny() -> dict[str, Any]:
    """A SuperGradients trainer-style checkpoint of a tiny conv net."""
    rng = np.random.default_rng(0)
    net, ema_net = _tiny_net(rng), _tiny_net(rng)
    return {
        "net": net,
        "ema_net": ema_net,
        "epoch": 7,
        "acc": 0.625,
        "optimizer_state_dict": {
            "state": {0: {"momentum_buffer": random_array(rng, np.float32, (4, 2, 3, 3))}},
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "nesterov": False, "params": [0, 1]}],
        },
        "ema_params": {"decay": 0.9999, "decay_type": "threshold", "beta": 15},
        "torch_version": "2.13.0",
    }


def legacy() -> dict[str, Any]:
    """Classic dtypes for the legacy format: a tie, a view with an offset, 0-d and empty."""
    rng = np.random.default_rng(1)
    base = random_array(rng, np.float32, (10,))
    return {
        "w": base.reshape(2, 5),
        "tail": base[3:7],
        "tied": base.reshape(2, 5),
        "count": np.array(3, np.int64),
        "mask": random_array(rng, np.bool_, (3,)),
        "empty": np.zeros((0, 2), np.float64),
        "half": random_array(rng, np.float16, (2, 2)),
        "meta": [1, "two", (3.5, None)],
    }


def new_dtypes() -> dict[str, Any]:
    """The dtypes torch writes through UntypedStorage, and bfloat16."""
    rng = np.random.default_rng(2)
    out: dict[str, Any] = {name: random_array(rng, DTYPES[name], (2, 3)) for name in NEW_DTYPES}
    out["bfloat16"] = random_array(rng, DTYPES["bfloat16"], (3,))
    out["uint16_view"] = out["uint16"][1]
    return out


def layouts() -> dict[str, Any]:
    """Strides torch keeps: channels_last, transposed, expanded (zero strides), a column."""
    rng = np.random.default_rng(3)
    matrix = random_array(rng, np.float32, (3, 4))
    row = random_array(rng, np.int32, (4,))
    return {
        "conv": random_array(rng, np.float32, (2, 3, 3, 3)).transpose(0, 3, 1, 2),
        "matrix": matrix,
        "transposed": matrix.T,
        "column": matrix[:, 1],
        "expanded": np.broadcast_to(row, (3, 4)),
        "scalar": matrix[2, 3, ...],
        "empty": matrix[:, 4:],
    }


FIXTURES: dict[str, Callable[[], Any]] = {
    "sg_tiny.pth": sg_tiny,
    "legacy.pth": legacy,
    "new_dtypes.pth": new_dtypes,
    "layouts.pth": layouts,
}


def write_fixture(name: str, path: str | os.PathLike[str]) -> None:
    """Writes fixture ``name`` with ``torch.save`` (the legacy one in the legacy format)."""
    import torch

    torch.save(
        to_torch(FIXTURES[name]()), path, _use_new_zipfile_serialization=name != "legacy.pth"
    )


# ---- numpy <-> torch, keeping storages ----


def _root(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def to_torch(obj: Any) -> Any:
    """``obj`` with each numpy array a tensor of its bits and strides; arrays that are views of
    one buffer become views of one storage, one array object one tensor."""
    import torch

    roots: dict[int, Any] = {}
    tensors: dict[int, Any] = {}

    def tensor(array: np.ndarray) -> Any:
        root = _root(array)
        if id(root) not in roots:
            assert root.flags.c_contiguous and root.dtype == array.dtype, "views of own arrays"
            flat = root.reshape(-1)
            carrier = flat.view(np.uint8 if flat.itemsize == 1 else np.int16)
            torch_dtype = getattr(torch, _torch_name(root.dtype))
            if root.dtype.name in ML_DTYPES:  # their bits through an integer
                roots[id(root)] = torch.from_numpy(carrier.copy()).view(torch_dtype)
            else:
                roots[id(root)] = torch.from_numpy(flat.copy())
        size = array.itemsize
        offset = (
            array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        ) // size
        strides = tuple(s // size for s in array.strides)
        return torch.as_strided(roots[id(root)], array.shape, strides, offset)

    def walk(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            if id(value) not in tensors:
                tensors[id(value)] = tensor(value)
            return tensors[id(value)]
        return _map_containers(value, walk)

    return walk(obj)


def _torch_name(dtype: np.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _map_containers(value: Any, walk: Callable[[Any], Any]) -> Any:
    """``value`` with ``walk`` applied inside dicts (OrderedDicts keep ``_metadata``), lists,
    tuples; other values as they are."""
    if isinstance(value, dict):
        out = type(value)((k, walk(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = walk(value._metadata)
        return out
    if type(value) in (list, tuple):
        return type(value)(map(walk, value))
    return value


def from_torch(obj: Any) -> Any:
    """What ``torch.load`` returned, as ``read_checkpoint`` should return it: each tensor (and
    Parameter) a numpy array with its dtype, shape and strides, tensors of one storage views of
    one buffer; ``torch.Size`` a tuple."""
    import torch

    storages: dict[int, np.ndarray] = {}

    def array(t: Any) -> np.ndarray:
        storage = t.untyped_storage()
        key = storage.data_ptr() if storage.nbytes() else id(storage)
        if key not in storages:
            u8 = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
            storages[key] = u8.numpy()
        dtype = DTYPES[str(t.dtype).removeprefix("torch.")]
        strides = tuple(s * dtype.itemsize for s in t.stride())
        buffer = storages[key]
        if t.numel() == 0:
            return np.ndarray(t.shape, dtype, buffer=buffer[:0], strides=strides)
        return np.ndarray(t.shape, dtype, buffer, t.storage_offset() * dtype.itemsize, strides)

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Size):
            return tuple(value)
        if isinstance(value, torch.Tensor):
            return array(value)
        return _map_containers(value, walk)

    return walk(obj)


# ---- comparing ----


def assert_same(got: Any, want: Any, where: str = "", strides: bool = True) -> None:
    """Asserts ``got`` is ``want``: containers of the same type with keys in the same order,
    arrays of the same dtype, shape, strides in elements (when ``strides``; not compared for
    empty arrays) and bytes, scalars
    of the same type and bits."""
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: {type(got).__name__}, not an array"
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{where}: shape {got.shape} != {want.shape}"
        if strides and want.size:  # an empty array's strides address nothing
            assert elements(got) == elements(want), (
                f"{where}: strides {got.strides} != {want.strides}"
            )
        assert got.tobytes() == want.tobytes(), f"{where}: bits differ"
        return
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]", strides)
        if isinstance(want, collections.OrderedDict):
            assert hasattr(got, "_metadata") == hasattr(want, "_metadata"), f"{where}: _metadata"
            if hasattr(want, "_metadata"):
                assert_same(got._metadata, want._metadata, f"{where}._metadata", strides)
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]", strides)
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), f"{where}: {got!r} != {want!r}"
    elif isinstance(want, complex):
        assert_same((got.real, got.imag), (want.real, want.imag), where, strides)
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def elements(array: np.ndarray) -> tuple[int, ...]:
    """An array's strides in elements."""
    return tuple(s // array.itemsize for s in array.strides)


def arrays(obj: Any) -> list[np.ndarray]:
    """The arrays in ``obj``, in the order ``assert_same`` visits them."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        found = [a for v in obj.values() for a in arrays(v)]
        return found + arrays(getattr(obj, "_metadata", None))
    if type(obj) in (list, tuple):
        return [a for v in obj for a in arrays(v)]
    return []


def assert_same_sharing(got: Any, want: Any) -> None:
    """Asserts two arrays in ``got`` share memory exactly when the matching ones in ``want`` do."""
    a, b = arrays(got), arrays(want)
    assert len(a) == len(b)
    for i in range(len(a)):
        for j in range(i):
            assert np.shares_memory(a[i], a[j]) == np.shares_memory(b[i], b[j]), (i, j)


# ---- the corpus, written by torch ----


def build_corpus(folder: str | os.PathLike[str]) -> dict[str, pathlib.Path]:
    """Writes the corpus into ``folder`` with torch; returns name -> file."""
    import torch
    from torch import nn

    folder = pathlib.Path(folder)
    torch.manual_seed(0)
    rng = np.random.default_rng(10)
    files: dict[str, Any] = {}

    files["dtypes"] = to_torch({n: random_array(rng, d, (2, 3)) for n, d in DTYPES.items()})
    base = torch.randn(12)
    files["views"] = {
        "base": base,
        "tied": base,
        "slice": base[2:7],
        "overlap": base[4:10],
        "matrix": base.view(3, 4),
        "column": base.view(3, 4)[:, 1],
        "half": torch.randn(6).half()[1:],
        "u16_a": (u16 := torch.from_numpy(random_array(rng, np.uint16, (8,))))[2:],
        "u16_b": u16[:3],
    }
    conv = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    files["layouts"] = {
        "channels_last": conv,
        "transposed": torch.randn(3, 5).t(),
        "expanded": torch.randn(3, 1).expand(3, 4),
        "expanded_0d": torch.tensor(2.5).expand(2, 3),
        "scalar": torch.tensor(-1.25, dtype=torch.float64),
        "scalar_in_storage": torch.arange(5, dtype=torch.int32)[3],
        "empty": torch.empty(0, 3),
        "empty_strided": torch.randn(4, 3)[:, 3:],
        "float8_t": torch.randn(2, 3).to(torch.float8_e5m2).t(),
    }
    files["parameters"] = {
        "p": nn.Parameter(torch.randn(3)),
        "frozen": nn.Parameter(torch.randn(2, 2), requires_grad=False),
        "list": [nn.Parameter(torch.randn(1)), torch.zeros(2, dtype=torch.int64)],
    }
    model = _model(nn)
    files["module"] = model.state_dict()
    files["module_channels_last"] = model.to(memory_format=torch.channels_last).state_dict()
    files["containers"] = {
        "dict": {1: "one", "two": 2.0, (3, 4): [None, True, False]},
        "ordered": collections.OrderedDict([("b", 1), ("a", [torch.ones(1)])]),
        "list": [1, -2, 2**70, -(2**65), 0.1, float("inf"), float("-inf"), -0.0],
        "tuple": (torch.zeros(2), (), ("nested", ("deep",))),
        "set": {1, 2, "three"},
        "bytes": b"\x00\xffabc",
        "complex": complex(1.5, -2.0),
        "str": "héllo wörld ✓",
        "size": torch.Size([2, 3]),
        "none": None,
        "empty": {"list": [], "dict": {}, "tuple": (), "str": ""},
    }
    files["many"] = {f"layer{i}.weight": torch.randn(2) for i in range(300)}
    files["sg_sgd"] = _sg_trainer(torch, nn, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    files["sg_adam"] = _sg_trainer(torch, nn, lambda p: torch.optim.Adam(p, lr=1e-3))

    out = {}
    for name, obj in files.items():
        out[name] = folder / f"{name}.pth"
        torch.save(obj, out[name])
    legacy_obj = {**files["views"], **files["parameters"], "module": files["module"]}
    legacy_obj.pop("u16_a"), legacy_obj.pop("u16_b")  # the legacy format has no uint16
    out["legacy"] = folder / "legacy.pth"
    torch.save(legacy_obj, out["legacy"], _use_new_zipfile_serialization=False)
    original = folder / "original_name.pth"
    torch.save(files["views"], original)
    out["renamed"] = folder / "renamed.pth"
    original.rename(out["renamed"])
    out["deflated"] = folder / "deflated.pth"
    _rezip(out["sg_sgd"], out["deflated"], zipfile.ZIP_DEFLATED)
    out["big_endian"] = folder / "big_endian.pth"
    classic = {n: to_torch(random_array(rng, DTYPES[n], (2, 3))) for n in STORAGES}
    write_big_endian(classic, out["big_endian"])
    return out


def _model(nn: Any) -> Any:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2)
    )


def _sg_trainer(torch: Any, nn: Any, optimizer: Callable[[Any], Any]) -> dict[str, Any]:
    """A SuperGradients trainer's checkpoint after two steps of ``optimizer``."""
    model = _model(nn)
    ema = _model(nn)
    opt = optimizer(model.parameters())
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 3, 3)).square().sum().backward()
        opt.step()
    return {
        "net": model.state_dict(),
        "ema_net": ema.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "epoch": 12,
        "acc": 0.8125,
        "ema_params": {"decay": 0.9999, "decay_type": "exp", "beta": 15.0},
        "torch_version": str(torch.__version__),
    }


def _rezip(source: pathlib.Path, target: pathlib.Path, compression: int) -> None:
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(target, "w", compression) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info))


def write_big_endian(tensors: dict[str, Any], path: pathlib.Path) -> None:
    """``torch.save(tensors)`` with each storage's bytes swapped per element (complex: per
    part) and ``byteorder`` "big": the file a big-endian machine writes. One contiguous tensor
    per storage, so storage ``i`` is the ``i``-th tensor."""
    import torch

    torch.save(tensors, path)
    with zipfile.ZipFile(path) as z:
        records = {info.filename: z.read(info) for info in z.infolist()}
    folder = next(name for name in records if name.endswith("/data.pkl"))[: -len("data.pkl")]
    records[folder + "byteorder"] = b"big"
    for i, t in enumerate(tensors.values()):
        dtype = DTYPES[str(t.dtype).removeprefix("torch.")]
        width = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
        data = np.frombuffer(records[f"{folder}data/{i}"], np.uint8)
        records[f"{folder}data/{i}"] = data.reshape(-1, width)[:, ::-1].tobytes()
    write_zip(path, records)


# ---- crafted files, no torch needed ----


def write_zip(
    path: str | os.PathLike[str],
    records: dict[str, bytes],
    compression: int = zipfile.ZIP_STORED,
    align: int = 64,
) -> None:
    """A zip of ``records`` whose payloads start on ``align``-byte boundaries (padded in an
    "FB" extra field, as torch.save pads them)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            start = z.fp.tell() + 30 + len(name.encode()) + 4  # type: ignore[union-attr]
            pad = -start % align
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            z.writestr(info, data)


class Global(NamedTuple):
    """A GLOBAL opcode: ``module.name``, never imported."""

    module: str
    name: str


class Call(NamedTuple):
    """``func(*args)`` as REDUCE."""

    func: Any
    args: tuple


class Build(NamedTuple):
    """``obj`` with BUILD ``state``."""

    obj: Any
    state: Any


class Persistent(NamedTuple):
    """A persistent id (BINPERSID)."""

    pid: tuple


class _Crafter(pickle._Pickler):  # type: ignore[name-defined,misc]
    """The pure-Python pickler, writing ``Global``/``Call``/``Build`` as opcodes."""

    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, Persistent) else None

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, Call):
            self.save(obj.func)
            self.save(tuple(obj.args))
            self.write(pickle.REDUCE)
        elif isinstance(obj, Build):
            self.save(obj.obj)
            self.save(obj.state)
            self.write(pickle.BUILD)
        else:
            super().save(obj, save_persistent_id)


def craft_pickle(obj: Any) -> bytes:
    """``obj`` pickled with protocol 2, ``Global``/``Call``/``Build``/``Persistent`` written as
    their opcodes (bytes as ``_codecs.encode``, as torch writes them)."""
    import io

    buffer = io.BytesIO()
    _Crafter(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def ordered_dict() -> Call:
    return Call(Global("collections", "OrderedDict"), ())


def tensor_call(
    key: str,
    dtype: str,
    numel: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int = 0,
    legacy: bool = False,
) -> Call:
    """The ``_rebuild_tensor_v2``/``_v3`` call torch writes for a tensor of storage ``key``
    holding ``numel`` elements of ``dtype`` (a torch name); ``legacy``: as the legacy format
    writes it (a sixth field, the view metadata)."""
    if dtype in STORAGES:
        pid: tuple = ("storage", Global("torch", STORAGES[dtype]), key, "cpu", numel)
        pid += (None,) * legacy
        args: tuple = (Persistent(pid), offset, size, stride, False, ordered_dict())
        return Call(Global("torch._utils", "_rebuild_tensor_v2"), args)
    nbytes = numel * DTYPES[dtype].itemsize
    pid = ("storage", Global("torch.storage", "UntypedStorage"), key, "cpu", nbytes)
    args = (Persistent(pid), offset, size, stride, False, ordered_dict(), Global("torch", dtype))
    return Call(Global("torch._utils", "_rebuild_tensor_v3"), args)


def crafted_pth(
    path: str | os.PathLike[str],
    obj: Any,
    storages: dict[str, bytes] | None = None,
    folder: str = "archive",
    pickled: bytes | None = None,
    byteorder: bytes | None = b"little",
) -> pathlib.Path:
    """A zip laid out as torch.save lays it out, holding ``obj`` (or the pickle ``pickled``)
    and the storages ``key -> bytes`` (``byteorder`` None: no such record)."""
    records = {
        f"{folder}/data.pkl": craft_pickle(obj) if pickled is None else pickled,
        f"{folder}/.format_version": b"1",
        f"{folder}/.storage_alignment": b"64",
    }
    if byteorder is not None:
        records[f"{folder}/byteorder"] = byteorder
    for key, data in (storages or {}).items():
        records[f"{folder}/data/{key}"] = data
    records[f"{folder}/version"] = b"3\n"
    write_zip(path, records)
    return pathlib.Path(path)


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = {
    "protocol_version": 1001,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}


def crafted_legacy(
    path: str | os.PathLike[str],
    obj: Any,
    storages: dict[str, tuple[int, bytes]],
    head: tuple[Any, Any, Any] = (LEGACY_MAGIC, 1001, LEGACY_SYS_INFO),
    keys: Any = None,
) -> pathlib.Path:
    """A legacy-format file: the ``head`` pickles (magic number, protocol, sys_info), ``obj``,
    the storage keys (``keys``, else sorted ``storages``), then each storage as an int64
    element count and its bytes."""
    parts = [craft_pickle(x) for x in (*head, obj, sorted(storages) if keys is None else keys)]
    for key in sorted(storages):
        numel, data = storages[key]
        parts.append(struct.pack("<q", numel) + data)
    pathlib.Path(path).write_bytes(b"".join(parts))
    return pathlib.Path(path)


def run_marker(folder: str | os.PathLike[str]) -> None:
    """What a hostile pickle calls by name (``tests.pth_corpus.run_marker``): leaves a marker
    file, so a test sees whether code from a file ran."""
    pathlib.Path(folder, MARKER_NAME).touch()


# ---- random state_dicts ----

_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True)
_SHAPES = st.lists(st.integers(0, 3), max_size=3).map(tuple)


@st.composite
def state_dicts(draw: st.DrawFn, dtypes: tuple[str, ...] = tuple(DTYPES)) -> dict[str, np.ndarray]:
    """name -> contiguous array, shapes with 0-d and empty ones, any of ``dtypes``; some names
    hold the array of an earlier name (a tie)."""
    names = draw(st.lists(_NAME, min_size=1, max_size=6, unique=True))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    out: dict[str, np.ndarray] = {}
    for name in names:
        if out and draw(st.integers(0, 4)) == 0:
            out[name] = out[draw(st.sampled_from(sorted(out)))]
        else:
            dtype = DTYPES[draw(st.sampled_from(dtypes))]
            out[name] = random_array(rng, dtype, draw(_SHAPES))
    return out


def ties(state_dict: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Pairs of names holding one array object."""
    names = list(state_dict)
    for i, a in enumerate(names):
        for b in names[:i]:
            if state_dict[a] is state_dict[b]:
                yield b, a


if __name__ == "__main__":
    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    for fixture in FIXTURES:
        write_fixture(fixture, FIXTURE_DIR / fixture)
