"""The ``torch.save`` pickle machine (``interop._pickle``), with Python's own pickle as the oracle:
what ``pickle.dumps(protocol=2)`` writes for plain values reads back equal, what ``dump``
writes ``pickle.loads`` reads back equal, and hostile pickles are refused with the file named
before anything runs or is allocated."""

from __future__ import annotations

import pickle
import struct
from collections import Counter, OrderedDict

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from interop._pickle import StorageId, Tensor, dump, global_name, load

PATH = "ckpt.pth"


def _load(data: bytes):
    return load(data, PATH, _no_storage, _no_tensor)[0]


def _no_storage(pid):
    raise AssertionError(f"no storage expected, got {pid}")


def _no_tensor(*args):
    raise AssertionError(f"no tensor expected, got {args}")


def _no_tensors(value, path):
    return None


keys = st.one_of(st.text(max_size=8), st.integers(-(2**70), 2**70))
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**1000), 2**1000),
    st.floats(allow_nan=False),
    st.complex_numbers(allow_nan=False),
    st.text(),
    st.binary(min_size=1),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
        st.dictionaries(keys, inner, max_size=4).map(OrderedDict),
        st.sets(st.one_of(st.integers(), st.text(max_size=4)), max_size=4),
    ),
    max_leaves=20,
)


def _same(a, b) -> bool:
    """Equal, with the same types all the way down (``1 == 1.0 == True`` is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


@given(values)
def test_what_dump_writes_python_and_load_read_back_the_same(value) -> None:
    data = dump(value, _no_tensors)
    assert _same(pickle.loads(data), value)
    assert _same(_load(data), value)


@given(values)
def test_what_python_pickles_at_protocol_2_reads_back_the_same(value) -> None:
    assert _same(_load(pickle.dumps(value, protocol=2)), value)


def test_shared_and_self_containing_values_keep_their_identity() -> None:
    shared = [1, 2]
    looped: list = [shared]
    looped.append(looped)
    back = _load(dump({"a": shared, "b": shared, "loop": looped}, _no_tensors))
    assert back["a"] is back["b"] is back["loop"][0] and back["loop"][1] is back["loop"]


def test_a_state_dicts_metadata_comes_back_as_its_attribute() -> None:
    state_dict = OrderedDict(w=1)
    state_dict._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    for data in (dump(state_dict, _no_tensors), pickle.dumps(state_dict, protocol=2)):
        back = _load(data)
        assert back == {"w": 1} and back._metadata == {"": {"version": 1}}


def test_counters_bytearrays_and_empty_bytes() -> None:
    value = {"c": Counter("abca"), "ba": bytearray(b"\x00\xff"), "b": b"\x00\xff"}
    assert _same(_load(dump(value, _no_tensors)), value)
    assert _same(pickle.loads(dump(value, _no_tensors)), value)
    with pytest.raises(ValueError, match="builtins.bytes"):  # Python's b"", refused by torch
        _load(pickle.dumps(b"", protocol=2))


@pytest.mark.parametrize(
    "scalar",
    [np.float64(0.5), np.float32(-1.25), np.int64(-(2**40)), np.uint8(7), np.bool_(True),
     np.complex64(1 - 2j), np.float16(3.5)],
    ids=repr,
)  # fmt: skip
def test_numpy_scalars_are_decoded_as_data(scalar) -> None:
    back = _load(pickle.dumps({"acc": scalar}, protocol=2))["acc"]
    assert type(back) is type(scalar) and back.tobytes() == scalar.tobytes()


def test_a_big_endian_numpy_scalar_is_read_in_its_byte_order() -> None:
    scalar = np.array(1.5, ">f8")[()]
    back = _load(pickle.dumps(scalar, protocol=2))
    assert back == 1.5 and back.dtype == np.float64


def test_numpy_object_arrays_and_other_numpy_globals_are_refused() -> None:
    with pytest.raises(ValueError, match=r"numpy dtype 'O8'|numpy._core.multiarray._reconstruct"):
        _load(pickle.dumps(np.array([1.0]), protocol=2))


def _rebuild_v2(key: str, storage: str, numel: int) -> bytes:
    """A ``_rebuild_tensor_v2`` call as torch.save writes it, for a 1-d tensor of ``numel``."""
    pid = (
        b"((X\x07\x00\x00\x00storage"
        + f"ctorch\n{storage}\n".encode()
        + b"X"
        + struct.pack("<I", len(key))
        + key.encode()
        + b"X\x03\x00\x00\x00cpuJ"
        + struct.pack("<i", numel)
        + b"tQ"
    )
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        + pid
        + b"K\x00J"
        + struct.pack("<i", numel)
        + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"
    )


def test_tensors_are_made_by_the_callbacks_from_storages() -> None:
    made = []

    def storage(pid: StorageId):
        made.append(pid)
        return pid

    def tensor(store, offset, size, stride, dtype):
        return ("tensor", store.key, offset, size, stride, dtype)

    data = b"\x80\x02](" + _rebuild_v2("0", "HalfStorage", 3) + _rebuild_v2("0", "HalfStorage", 3)
    value, end = load(data + b"e.", PATH, storage, tensor)
    assert value == [("tensor", "0", 0, (3,), (1,), None)] * 2 and end == len(data) + 2
    assert made == [StorageId(np.dtype(np.float16), True, "0", 3)] * 2


def test_dump_writes_tensors_as_torch_save_does() -> None:
    block = np.zeros(6, ml_dtypes.bfloat16)
    wide = np.zeros(2, np.uint32)

    def tensor(value, path):
        if value is block:
            return Tensor("0", block, 0, (2, 3), (1, 2))
        if value is wide:
            return Tensor("1", wide, 0, (2,), (1,))
        return None

    data = dump({"w": block, "u": wide, "tied": block}, tensor)
    assert b"ctorch\nBFloat16Storage\n" in data and b"ctorch\nuint32\n" in data
    made = {}

    def storage(pid: StorageId):
        return made.setdefault(pid.key, pid)

    back = load(data, PATH, storage, lambda s, *rest: (s, *rest))[0]
    assert back["w"] == (StorageId(block.dtype, True, "0", 6), 0, (2, 3), (1, 2), None)
    assert back["u"] == (StorageId(np.dtype(np.uint8), False, "1", 8), 0, (2,), (1,), wide.dtype)
    assert back["tied"] is back["w"]


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"net": {"w": object()}}, "['net']['w'] (a object)"),
        ({"cfg": [1, (2, print)]}, "['cfg'][1][1] (a builtin_function_or_method)"),
        ({"acc": np.float64(0.5)}, "['acc'] (a float64)"),
        ({"big": 2**3000}, "['big']: an int of 3001 bits"),
        ({frozenset(): 1}, "[key frozenset()] (a frozenset)"),
    ],
)
def test_dump_names_the_key_path_of_what_it_cannot_write(value, where) -> None:
    with pytest.raises(TypeError) as e:
        dump(value, _no_tensors)
    assert str(e.value).startswith(f"cannot store {where}")


HOSTILE = {
    "os.system": (
        b"\x80\x02cos\nsystem\nX\x06\x00\x00\x00exit 1\x85Rcposix\nsystem\n0.",
        "needs globals this reader does not allow: os.system, posix.system.",
    ),
    "builtins.eval": (
        b"\x80\x02c__builtin__\neval\nX\x01\x00\x00\x001\x85R.",
        "needs globals this reader does not allow: builtins.eval.",
    ),
    "STACK_GLOBAL": (b"\x80\x02X\x02\x00\x00\x00osX\x06\x00\x00\x00system\x93.", "b'\\x93'"),
    "INST": (b"\x80\x02(ios\nsystem\n.", "opcode b'i'"),
    "BINBYTES": (b"\x80\x02B\x01\x00\x00\x00a.", "opcode b'B'"),
    "FRAME": (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00N.", "not a protocol 2 pickle"),
    "protocol 0": (b"N.", "not a protocol 2 pickle"),
    "BUILD on a list": (b"\x80\x02]}b.", "BUILD on a list"),
    "BUILD with a dunder": (
        b"\x80\x02ccollections\nOrderedDict\n)R}X\t\x00\x00\x00__class__Nsb.",
        "attribute names that are not plain names",
    ),
    "REDUCE of a dtype": (b"\x80\x02ctorch\nfloat32\n)R.", "calls a TorchDtype"),
    "SETITEM on a list": (b"\x80\x02]K\x01K\x02s.", "SETITEM on a list"),
    "memo bomb": (b"\x80\x02Nr\xff\xff\xff\xff.", "memo index 4,294,967,295 past"),
    "memo read first": (b"\x80\x02h\x05.", "memo index 5 read before it is written"),
    "length bomb": (b"\x80\x02X\xff\xff\xff\xff.", "4,294,967,295 bytes claimed, 1 left"),
    "truncated": (b"\x80\x02]q\x00(K\x01", "truncated"),
    "persistent id": (b"\x80\x02X\x01\x00\x00\x00xQ.", "only storages are allowed"),
    "storage view": (
        b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000"
        b"X\x03\x00\x00\x00cpuK\x01(K\x00K\x00K\x01ttQ.",
        "is a view of another",
    ),
    "two values left": (b"\x80\x02NN.", "more than one value left"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pickles_are_refused_naming_the_file(name, tmp_path, monkeypatch) -> None:
    data, message = HOSTILE[name]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        _load(data)
    assert str(e.value).startswith(PATH) and message in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_refused_global_stops_before_the_call_so_nothing_runs(tmp_path) -> None:
    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()
    data = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
    with pytest.raises(ValueError, match="os.system"):
        _load(data)
    assert not marker.exists()


@given(st.binary(max_size=64))
def test_any_bytes_give_a_value_or_a_value_error_naming_the_file(tail) -> None:
    try:
        _load(b"\x80\x02" + tail)
    except ValueError as e:
        assert str(e).startswith(PATH)


@given(st.sampled_from(sorted(pickle.whichmodule.__globals__["_compat_pickle"].NAME_MAPPING)))
def test_python_2_names_are_read_as_python_3_spells_them(pair) -> None:
    module, name = pickle.whichmodule.__globals__["_compat_pickle"].NAME_MAPPING[pair]
    assert global_name(*pair) == f"{module}.{name}"
