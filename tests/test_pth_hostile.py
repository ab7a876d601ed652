"""Hostile and broken ``.pth`` files: ``interop.read_checkpoint`` refuses each with a
``ValueError`` or ``OSError`` naming the file, and no code from a file runs.

The files are crafted from pickle opcodes and ``zipfile`` (``tests/pth_corpus.py``), no torch
needed. Code a file asks for would create a marker file (``os.system("touch ...")``,
``tests.pth_corpus.run_marker``, ...); each test checks the marker is absent. Each hostile file
has an honest twin (``honest``), which reads, so a refusal is the hostile part's doing. Length
and memo bombs are read in a child process whose address space is capped, so allocating what
they claim fails the test rather than the machine.
"""

from __future__ import annotations

import collections
import pathlib
import re
import resource
import struct
import zipfile
from collections.abc import Callable

import numpy as np
import pytest

import interop
from tests import pth_corpus
from tests.pth_corpus import (
    MARKER_NAME,
    Build,
    Call,
    Global,
    craft_pickle,
    crafted_legacy,
    crafted_pth,
    ordered_dict,
    tensor_call,
)
from tests.unprivileged import in_child

W = np.arange(6, dtype=np.float32)  # the honest storage "0": six float32 values


def _w(**changes) -> Call:
    """The honest tensor of storage "0" (a 2x3 view), with ``changes`` to its metadata."""
    fields = {"key": "0", "dtype": "float32", "numel": 6, "size": (2, 3), "stride": (3, 1)}
    return tensor_call(**{**fields, **changes})


def _zip(tmp: pathlib.Path, obj, storages: dict[str, bytes] | None = None) -> pathlib.Path:
    return crafted_pth(
        tmp / "hostile.pth", obj, {"0": W.tobytes()} if storages is None else storages
    )


def _raw_zip(tmp: pathlib.Path, opcodes: bytes) -> pathlib.Path:
    """A zip whose data.pkl is ``opcodes`` between PROTO 2 and STOP."""
    return crafted_pth(
        tmp / "hostile.pth", None, {"0": W.tobytes()}, pickled=b"\x80\x02" + opcodes + b"."
    )


def _unicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _touch(tmp: pathlib.Path) -> str:
    return f"touch {tmp / MARKER_NAME}"


def honest(tmp: pathlib.Path) -> pathlib.Path:
    return _zip(tmp, {"w": _w(), "epoch": 3})


# name -> the file, given the test's folder (where the marker would appear)
CODE: dict[str, Callable[[pathlib.Path], pathlib.Path]] = {
    "os.system": lambda t: _zip(t, {"x": Call(Global("os", "system"), (_touch(t),)), "w": _w()}),
    "posix.system": lambda t: _zip(t, {"x": Call(Global("posix", "system"), (_touch(t),))}),
    "builtins.eval": lambda t: _zip(
        t,
        {"x": Call(Global("builtins", "eval"), (f"open({str(t / MARKER_NAME)!r}, 'w')",))},
    ),
    "__builtin__.eval": lambda t: _zip(
        t,
        {"x": Call(Global("__builtin__", "eval"), (f"open({str(t / MARKER_NAME)!r}, 'w')",))},
    ),
    "subprocess.Popen": lambda t: _zip(
        t, {"x": Call(Global("subprocess", "Popen"), (["touch", str(t / MARKER_NAME)],))}
    ),
    "builtins.getattr": lambda t: _zip(
        t,
        {
            "x": Call(
                Call(
                    Global("builtins", "getattr"),
                    (Call(Global("builtins", "__import__"), ("os",)), "system"),
                ),
                (_touch(t),),
            )
        },
    ),
    "our own function": lambda t: _zip(
        t, {"x": Call(Global("tests.pth_corpus", "run_marker"), (str(t),))}
    ),
    "a torch name outside the table": lambda t: _zip(
        t, {"x": Call(Global("torch", "load"), (str(t / "other.pth"),))}
    ),
    "a storage type outside the table": lambda t: _zip(
        t, {"x": Call(Global("torch", "QInt8Storage"), ())}
    ),
    "STACK_GLOBAL": lambda t: _raw_zip(
        t, _unicode("os") + _unicode("system") + b"\x93" + _unicode(_touch(t)) + b"\x85R"
    ),
    "STACK_GLOBAL of a table name": lambda t: _raw_zip(
        t, _unicode("collections") + _unicode("OrderedDict") + b"\x93)R"
    ),
    "INST": lambda t: _raw_zip(t, b"(" + _unicode(_touch(t)) + b"ios\nsystem\n"),
    "INST of a table name": lambda t: _raw_zip(t, b"(icollections\nOrderedDict\n"),
    "OBJ": lambda t: _raw_zip(t, b"(cos\nsystem\n" + _unicode(_touch(t)) + b"o"),
    "NEWOBJ": lambda t: _raw_zip(t, b"ccollections\nOrderedDict\n)\x81"),
    "EXT1": lambda t: _raw_zip(t, b"\x82\x01"),
    "EXT2": lambda t: _raw_zip(t, b"\x83\x01\x00"),
    "PERSID text": lambda t: _raw_zip(t, b"P0\n"),
    "REDUCE of a dtype": lambda t: _zip(t, {"x": Call(Global("torch", "float32"), (_touch(t),))}),
    "REDUCE of a storage type": lambda t: _zip(
        t, {"x": Call(Global("torch", "FloatStorage"), (6,))}
    ),
    "REDUCE of a string": lambda t: _zip(t, {"x": Call("system", (_touch(t),))}),
    "REDUCE of an OrderedDict": lambda t: _zip(t, {"x": Call(ordered_dict(), ())}),
    "REDUCE of a tensor": lambda t: _zip(t, {"x": Call(_w(), ())}),
    "BUILD on a dict": lambda t: _zip(t, {"x": Build({}, {"a": 1})}),
    "BUILD on a list": lambda t: _zip(t, {"x": Build([1], {"append": 1})}),
    "BUILD on a string": lambda t: _zip(t, {"x": Build("s", {"a": 1})}),
    "BUILD on a tensor": lambda t: _zip(t, {"x": Build(_w(), {"a": 1})}),
    "BUILD on a table function": lambda t: _zip(
        t, {"x": Build(Global("torch._utils", "_rebuild_tensor_v2"), {"__code__": 1})}
    ),
    "BUILD on a table class": lambda t: _zip(
        t, {"x": Build(Global("collections", "OrderedDict"), {"__reduce__": 1})}
    ),
    "BUILD with a string state": lambda t: _zip(t, {"x": Build(ordered_dict(), "state")}),
    "BUILD with slot state": lambda t: _zip(
        t, {"x": Build(ordered_dict(), ({"_metadata": {}}, {"__class__": 1}))}
    ),
    "BUILD with __setstate__": lambda t: _zip(
        t, {"x": Build(ordered_dict(), {"__setstate__": Global("os", "system")})}
    ),
    "legacy: os.system": lambda t: crafted_legacy(
        t / "hostile.pth", {"x": Call(Global("os", "system"), (_touch(t),))}, {}
    ),
    "legacy: code in the magic number": lambda t: crafted_legacy(
        t / "hostile.pth",
        {},
        {},
        head=(
            Call(Global("os", "system"), (_touch(t),)),
            1001,
            pth_corpus.LEGACY_SYS_INFO,
        ),
    ),
    "legacy: code in sys_info": lambda t: crafted_legacy(
        t / "hostile.pth",
        {},
        {},
        head=(
            pth_corpus.LEGACY_MAGIC,
            1001,
            {"little_endian": Call(Global("tests.pth_corpus", "run_marker"), (str(t),))},
        ),
    ),
    "legacy: code in the storage keys": lambda t: crafted_legacy(
        t / "hostile.pth", {}, {}, keys=Call(Global("os", "system"), (_touch(t),))
    ),
}

LIES: dict[str, Callable[[pathlib.Path], pathlib.Path]] = {
    "extent past the storage": lambda t: _zip(t, {"w": _w(size=(2, 4), stride=(4, 1))}),
    "offset past the storage": lambda t: _zip(t, {"w": _w(size=(2,), stride=(1,), offset=5)}),
    "negative stride": lambda t: _zip(t, {"w": _w(size=(3,), stride=(-1,), offset=2)}),
    "negative offset": lambda t: _zip(t, {"w": _w(size=(2,), stride=(1,), offset=-1)}),
    "negative size": lambda t: _zip(t, {"w": _w(size=(-2,), stride=(1,))}),
    "sizes and strides of other lengths": lambda t: _zip(t, {"w": _w(size=(2, 3), stride=(1,))}),
    "a size that is not an int": lambda t: _zip(t, {"w": _w(size=("2", 3))}),
    "a stride that is a float": lambda t: _zip(t, {"w": _w(stride=(3.0, 1.0))}),
    "sizes whose product overflows int64": lambda t: _zip(
        t,
        {"w": _w(size=(5,), stride=(2**62,))},  # the extent wraps to 1 element in int64
    ),
    "sizes whose product is huge": lambda t: _zip(t, {"w": _w(size=(2**33, 2**33), stride=(1, 1))}),
    "a storage record missing": lambda t: _zip(t, {"w": _w(key="1")}),
    "a storage shorter than it claims": lambda t: _zip(
        t, {"w": _w(numel=6)}, {"0": W[:4].tobytes()}
    ),
    "a storage numel that is negative": lambda t: _zip(
        t, {"w": _w(numel=-1, size=(0,), stride=(1,))}
    ),
    "a v3 dtype that is not a dtype": lambda t: _zip(
        t,
        {
            "w": Call(
                Global("torch._utils", "_rebuild_tensor_v3"),
                (*_w().args[:6], "float32"),
            )
        },
    ),
    "a persistent id that is not a storage": lambda t: _zip(
        t,
        {
            "w": Call(
                Global("torch._utils", "_rebuild_tensor_v2"),
                (
                    pth_corpus.Persistent(("module", "os", "0")),
                    0,
                    (1,),
                    (1,),
                    False,
                    ordered_dict(),
                ),
            )
        },
    ),
    "legacy: a storage longer than the file": lambda t: crafted_legacy(
        t / "hostile.pth",
        {"w": tensor_call("0", "float32", 6, (6,), (1,), legacy=True)},
        {"0": (600, W.tobytes())},
    ),
    "legacy: a storage count that lies": lambda t: crafted_legacy(
        t / "hostile.pth",
        {"w": tensor_call("0", "float32", 6, (6,), (1,), legacy=True)},
        {"0": (4, W.tobytes())},
    ),
}


def _rewrite(path: pathlib.Path, old: bytes, new: bytes) -> pathlib.Path:
    data = path.read_bytes()
    assert data.count(old) >= 1
    path.write_bytes(data.replace(old, new))
    return path


def _deflated_claiming(t: pathlib.Path, size: int) -> pathlib.Path:
    """A zip whose data.pkl is deflated and whose headers claim ``size`` bytes unpacked."""
    path = t / "hostile.pth"
    pickled = craft_pickle({"w": _w()})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), pickled, zipfile.ZIP_DEFLATED)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", W.tobytes())
        z.writestr("archive/version", b"3\n")
    return _rewrite(path, struct.pack("<I", len(pickled)), struct.pack("<I", size))


BROKEN: dict[str, Callable[[pathlib.Path], pathlib.Path]] = {
    "a truncated zip": lambda t: _cut(honest(t), 0.5),
    "a zip cut before its last byte": lambda t: _cut(honest(t), -1),
    "a truncated pickle": lambda t: crafted_pth(
        t / "hostile.pth", None, {"0": W.tobytes()}, pickled=craft_pickle({"w": _w()})[:-9]
    ),
    "a pickle without STOP": lambda t: crafted_pth(
        t / "hostile.pth", None, {"0": W.tobytes()}, pickled=craft_pickle({"w": _w()})[:-1]
    ),
    "a zip with no data.pkl": lambda t: _without_pickle(t),
    "a deflated entry claiming 4 GB": lambda t: _deflated_claiming(t, 2**32 - 2),
    "an unknown byteorder": lambda t: crafted_pth(
        t / "hostile.pth", {"w": _w()}, {"0": W.tobytes()}, byteorder=b"middle"
    ),
    "two folders with a data.pkl": lambda t: _two_folders(t),
    "a folder": lambda t: _folder(t),
    "an empty file": lambda t: _write(t, b""),
    "random bytes": lambda t: _write(t, np.random.default_rng(0).bytes(4096)),
    "random bytes after a zip signature": lambda t: _write(
        t, b"PK\x03\x04" + np.random.default_rng(1).bytes(4096)
    ),
    "a pickle that is not a checkpoint": lambda t: _write(t, b"\x80\x02K\x01."),
    "a pickle of protocol 5": lambda t: crafted_pth(
        t / "hostile.pth", None, pickled=b"\x80\x05\x95\x02\x00\x00\x00\x00\x00\x00\x00K\x01."
    ),
}


def _cut(path: pathlib.Path, at: float) -> pathlib.Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * at)] if at > 0 else data[:-1])
    return path


def _write(t: pathlib.Path, data: bytes) -> pathlib.Path:
    (t / "hostile.pth").write_bytes(data)
    return t / "hostile.pth"


def _folder(t: pathlib.Path) -> pathlib.Path:
    (t / "hostile.pth").mkdir()
    return t / "hostile.pth"


def _two_folders(t: pathlib.Path) -> pathlib.Path:
    path = t / "hostile.pth"
    records = {f"{f}/data.pkl": craft_pickle({"w": i}) for i, f in enumerate(("a", "b"))}
    pth_corpus.write_zip(path, records)
    return path


def _without_pickle(t: pathlib.Path) -> pathlib.Path:
    path = t / "hostile.pth"
    pth_corpus.write_zip(path, {"archive/byteorder": b"little", "archive/data/0": W.tobytes()})
    return path


BOMBS: dict[str, bytes] = {
    "BINUNICODE of 2**32-1 bytes": b"X" + struct.pack("<I", 2**32 - 1) + b"abc",
    "BINUNICODE8 of 2**40 bytes": b"\x8d" + struct.pack("<Q", 2**40) + b"abc",
    "BINBYTES of 2**32-1 bytes": b"B" + struct.pack("<I", 2**32 - 1) + b"abc",
    "BINBYTES8 of 2**40 bytes": b"\x8e" + struct.pack("<Q", 2**40) + b"abc",
    "BYTEARRAY8 of 2**40 bytes": b"\x96" + struct.pack("<Q", 2**40) + b"abc",
    "LONG4 of 2**31-1 bytes": b"\x8b" + struct.pack("<i", 2**31 - 1) + b"abc",
    "LONG_BINPUT 2**32-1": b"N" + b"r" + struct.pack("<I", 2**32 - 1),
    "LONG_BINGET 2**32-1": b"N" + b"r" + struct.pack("<I", 0) + b"j" + struct.pack("<I", 2**32 - 1),
    "BINGET of nothing put": b"h\x05",
    "a tensor of 2**40 elements": b"",  # see _bomb
}


def _bomb(t: pathlib.Path, name: str) -> pathlib.Path:
    if name == "a tensor of 2**40 elements":
        return _zip(t, {"w": _w(numel=2**40, size=(2**40,), stride=(1,))})
    return _raw_zip(t, BOMBS[name])


def _refused(path: pathlib.Path) -> None:
    with pytest.raises((ValueError, OSError)) as refusal:
        interop.read_checkpoint(path)
    assert str(path) in str(refusal.value), refusal.value


def test_the_honest_twin_reads(tmp_path) -> None:
    got = interop.read_checkpoint(honest(tmp_path))
    pth_corpus.assert_same(got, {"w": W.reshape(2, 3), "epoch": 3})
    legacy = crafted_legacy(
        tmp_path / "legacy.pth",
        {"w": tensor_call("0", "float32", 6, (6,), (1,), legacy=True)},
        {"0": (6, W.tobytes())},
    )
    pth_corpus.assert_same(interop.read_checkpoint(legacy), {"w": W})


def test_a_file_without_a_byteorder_record_is_little_endian(tmp_path) -> None:
    path = crafted_pth(tmp_path / "old.pth", {"w": _w()}, {"0": W.tobytes()}, byteorder=None)
    pth_corpus.assert_same(interop.read_checkpoint(path), {"w": W.reshape(2, 3)})


def test_a_file_in_another_folder_reads(tmp_path) -> None:
    path = crafted_pth(tmp_path / "a.pth", {"w": _w()}, {"0": W.tobytes()}, folder="ckpt_best")
    pth_corpus.assert_same(interop.read_checkpoint(path), {"w": W.reshape(2, 3)})


def test_one_storage_under_two_dtypes_reads_as_torch_reads_it(tmp_path) -> None:
    """The first dtype named for a storage wins (torch's rule): ``v`` is float32, not int64."""
    path = _zip(tmp_path, {"w": _w(), "v": _w(dtype="int64", numel=3, size=(3,), stride=(1,))})
    got = interop.read_checkpoint(path)
    pth_corpus.assert_same(got, {"w": W.reshape(2, 3), "v": W[:3]})
    assert np.shares_memory(got["w"], got["v"])


def test_the_honest_twin_is_what_torch_reads(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    loaded = torch.load(honest(tmp_path), weights_only=True, mmap=True)
    pth_corpus.assert_same(pth_corpus.from_torch(loaded), {"w": W.reshape(2, 3), "epoch": 3})
    two_dtypes = _zip(
        tmp_path, {"w": _w(), "v": _w(dtype="int64", numel=3, size=(3,), stride=(1,))}
    )
    loaded = pth_corpus.from_torch(torch.load(two_dtypes, weights_only=True))
    pth_corpus.assert_same(loaded, {"w": W.reshape(2, 3), "v": W[:3]})


@pytest.mark.parametrize("case", CODE)
def test_a_file_asking_for_code_is_refused_and_nothing_runs(tmp_path, case) -> None:
    _refused(CODE[case](tmp_path))
    assert not (tmp_path / MARKER_NAME).exists()


@pytest.mark.parametrize("case", LIES)
def test_a_tensor_lying_about_its_storage_is_refused(tmp_path, case) -> None:
    _refused(LIES[case](tmp_path))


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_file_is_refused(tmp_path, case) -> None:
    _refused(BROKEN[case](tmp_path))


@pytest.mark.parametrize("case", BOMBS)
def test_a_length_or_memo_bomb_fails_at_once(tmp_path, case) -> None:
    path = _bomb(tmp_path, case)

    def attempt() -> str:
        status = pathlib.Path("/proc/self/status").read_text()
        used = int(re.search(r"VmSize:\s+(\d+) kB", status)[1]) * 1024
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), hard))
        try:
            interop.read_checkpoint(path)
        except (ValueError, OSError) as e:
            return f"refused, naming the file: {str(path) in str(e)}"
        return "read"

    assert in_child(attempt) == "refused, naming the file: True"


def test_every_global_a_file_needs_is_named(tmp_path) -> None:
    names = ["os.system", "builtins.eval", "subprocess.Popen", "tests.pth_corpus.run_marker"]
    calls = {name: Call(Global(*name.rsplit(".", 1)), (str(tmp_path),)) for name in names}
    path = _zip(tmp_path, {"w": _w(), **calls})
    with pytest.raises(ValueError) as refusal:
        interop.read_checkpoint(path)
    message = str(refusal.value)
    assert str(path) in message
    for name in names:
        assert name in message, name
    assert "torch._utils._rebuild_tensor_v2" not in message  # the table's names are not refused
    assert not (tmp_path / MARKER_NAME).exists()


def test_the_legacy_format_names_every_global_too(tmp_path) -> None:
    names = ["os.system", "subprocess.Popen"]
    calls = {name: Call(Global(*name.rsplit(".", 1)), ("x",)) for name in names}
    path = crafted_legacy(tmp_path / "hostile.pth", calls, {})
    with pytest.raises(ValueError) as refusal:
        interop.read_checkpoint(path)
    assert str(path) in str(refusal.value)
    for name in names:
        assert name in str(refusal.value), name


def test_a_build_trick_leaves_the_table_alone(tmp_path) -> None:
    """After files that BUILD on the table's names, the table still reads honest files."""
    before = dict(vars(collections.OrderedDict))
    for case in ("BUILD on a table function", "BUILD on a table class"):
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        _refused(CODE[case](folder))
    assert dict(vars(collections.OrderedDict)) == before
    test_the_honest_twin_reads(tmp_path)
