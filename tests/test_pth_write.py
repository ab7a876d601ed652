"""``interop.write_checkpoint``: files that ``torch.load(weights_only=True)`` reads bit-exactly
(with and without ``mmap=True``), laid out as ``torch.save`` lays them out, written atomically;
values it cannot represent refused by key.

The layout, round-trip, refusal and atomicity checks need no torch; torch is the oracle of the
others.
"""

from __future__ import annotations

import collections
import os
import pathlib
import pickletools
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import zipfile

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given

import interop
from tests import pth_corpus
from tests.pth_corpus import DTYPES, assert_same, from_torch, random_array, state_dicts
from tests.unprivileged import as_normal_user, in_child


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def rich() -> dict:
    """A checkpoint with every kind of value the writer takes, and arrays of every layout."""
    rng = np.random.default_rng(7)
    w = random_array(rng, np.float32, (3, 4))
    conv = random_array(rng, np.float32, (2, 3, 3, 4)).transpose(0, 3, 1, 2)
    net = collections.OrderedDict(
        [("fc.weight", w), ("fc.bias", random_array(rng, np.int64, (3,)))]
    )
    net._metadata = collections.OrderedDict([("", {"version": 1}), ("fc", {"version": 1})])
    return {
        "net": net,
        "ema_net": {"fc.weight": w, "conv": conv, "head": w},
        "every_dtype": {name: random_array(rng, d, (2,)) for name, d in DTYPES.items()},
        "layouts": {
            "transposed": w.T,
            "column": w[:, 1],
            "reversed": w[::-1, ::-2],
            "broadcast": np.broadcast_to(w[0], (2, 4)),
            "scalar": np.array(2.5, np.float64),
            "empty": np.zeros((0, 3), np.int8),
            "view_0d": w[1, 2, ...],
        },
        "jax": {
            "f32": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
            "bf16": jnp.ones((2,), jnp.bfloat16),
            "scalar": jnp.asarray(3, jnp.int32),
        },
        "epoch": 12,
        "acc": 0.8125,
        "big": 2**70,
        "flags": [True, False, None],
        "tuple": (1, "two", (3.5,)),
        "set": {1, 2, 3},
        "bytes": b"\x00\xffab",
        "bytearray": bytearray(b"cd"),
        "no_bytes": b"",
        "complex": complex(1.0, -2.5),
        "nan": float("nan"),
        "text": "héllo ✓",
        "int_keys": {0: {"momentum_buffer": w}, 1: {}},
    }


def expected(obj):
    """What torch.load should give back: jax arrays as numpy arrays."""
    if isinstance(obj, jnp.ndarray) and not isinstance(obj, np.ndarray):
        return np.asarray(obj)
    return pth_corpus._map_containers(obj, expected)


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_loads_what_it_writes(torch, tmp_path, mmap) -> None:
    path = tmp_path / "ckpt.pth"
    checkpoint = rich()
    interop.write_checkpoint(path, checkpoint)
    got = torch.load(path, weights_only=True, mmap=mmap)
    assert_same(from_torch(got), expected(checkpoint), strides=False)
    assert got["layouts"]["scalar"].shape == () and got["jax"]["scalar"].shape == ()
    assert got["jax"]["bf16"].dtype == torch.bfloat16
    storage = {k: v.untyped_storage().data_ptr() for k, v in got["ema_net"].items()}
    assert storage["fc.weight"] == storage["head"] != storage["conv"]
    net_w = got["net"]["fc.weight"].untyped_storage().data_ptr()
    assert (
        net_w
        == storage["fc.weight"]
        == got["int_keys"][0]["momentum_buffer"].untyped_storage().data_ptr()
    )


@pytest.mark.parametrize("mmap", [False, True])
@given(state_dict=state_dicts())
def test_random_state_dicts_load_in_torch_bit_exact(
    torch, tmp_path_factory, mmap, state_dict
) -> None:
    path = tmp_path_factory.mktemp("random") / "sd.pth"
    interop.write_checkpoint(path, state_dict)
    got = torch.load(path, weights_only=True, mmap=mmap)
    assert_same(from_torch(got), state_dict)
    names = list(state_dict)
    for i, a in enumerate(names):
        for b in names[:i]:
            if state_dict[a].size and state_dict[b].size:
                same = got[a].untyped_storage().data_ptr() == got[b].untyped_storage().data_ptr()
                assert same == (state_dict[a] is state_dict[b]), (a, b)


def test_torch_finds_no_global_it_would_refuse(torch, tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    interop.write_checkpoint(path, rich())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []


def test_the_same_jax_array_under_two_keys_is_one_storage(torch, tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    w = jnp.arange(4.0)
    interop.write_checkpoint(path, {"a": w, "b": w})
    got = torch.load(path, weights_only=True)
    assert got["a"].untyped_storage().data_ptr() == got["b"].untyped_storage().data_ptr()


def write_in_small_pieces(tmp_path: pathlib.Path, monkeypatch) -> tuple[pathlib.Path, dict]:
    """A checkpoint written in pieces of 1000 bytes, its write-back started every 4096."""
    monkeypatch.setattr(interop._pth, "_CHUNK", 1000)
    monkeypatch.setattr(interop._pth, "_WRITE_BACK", 4096)
    rng = np.random.default_rng(10)
    checkpoint = {
        "w": random_array(rng, np.float32, (50, 77)),
        "h": random_array(rng, np.float16, (999,)),
    }
    path = tmp_path / "ckpt.pth"
    interop.write_checkpoint(path, checkpoint)
    return path, checkpoint


@pytest.mark.parametrize("mmap", [False, True])
def test_torch_loads_records_written_piece_by_piece(torch, tmp_path, monkeypatch, mmap) -> None:
    path, checkpoint = write_in_small_pieces(tmp_path, monkeypatch)
    assert_same(from_torch(torch.load(path, weights_only=True, mmap=mmap)), checkpoint)


# ---- no torch needed ----


def local_headers(path: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Each record's (compression, data offset), from its local header."""
    data = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            h = info.header_offset
            assert data[h : h + 4] == b"PK\x03\x04", info.filename
            method, name_len, extra_len = struct.unpack("<8xH16xHH", data[h : h + 30])
            out[info.filename] = (method, h + 30 + name_len + extra_len)
    return out


def test_the_zip_is_laid_out_as_torch_save_lays_it_out(tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    checkpoint = {"w": np.ones((2, 3), np.float32), "b": np.arange(3), "u": np.ones(2, np.uint16)}
    interop.write_checkpoint(path, checkpoint)
    headers = local_headers(path)
    for name, (method, offset) in headers.items():
        assert method == zipfile.ZIP_STORED, name
        assert offset % 64 == 0, (name, offset)
    with zipfile.ZipFile(path) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
        names = z.namelist()
        assert {n.split("/")[0] for n in names} == {"ckpt"}
        assert names[0] == "ckpt/data.pkl"
        assert z.read("ckpt/byteorder") == b"little"
        assert z.read("ckpt/version").strip() == b"3"
        assert z.read("ckpt/.format_version") == b"1"
        assert z.read("ckpt/.storage_alignment") == b"64"
        assert sorted(n for n in names if n.startswith("ckpt/data/")) == [
            f"ckpt/data/{i}" for i in range(3)
        ]
        pickled = z.read("ckpt/data.pkl")
    ops = list(pickletools.genops(pickled))
    assert (ops[0][0].name, ops[0][1]) == ("PROTO", 2)
    assert max(op.proto for op, _, _ in ops) <= 2
    refused = {"STACK_GLOBAL", "FRAME", "INST", "OBJ", "BINBYTES", "LONG4", "PERSID", "EXT1"}
    assert not {op.name for op, _, _ in ops} & refused
    globals_ = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
    assert "torch._utils _rebuild_tensor_v3" in globals_  # uint16 goes through UntypedStorage
    assert "torch FloatStorage" in globals_ and "torch LongStorage" in globals_


@given(state_dict=state_dicts())
def test_random_state_dicts_round_trip(tmp_path_factory, state_dict) -> None:
    path = tmp_path_factory.mktemp("round") / "sd.pth"
    interop.write_checkpoint(path, state_dict)
    got = interop.read_checkpoint(path)
    assert_same(got, state_dict)
    for a, b in pth_corpus.ties(state_dict):
        assert state_dict[a].size == 0 or np.shares_memory(got[a], got[b]), (a, b)


def test_a_rich_checkpoint_round_trips(tmp_path) -> None:
    path = tmp_path / "ckpt.pth"
    checkpoint = rich()
    interop.write_checkpoint(path, checkpoint)
    got = interop.read_checkpoint(path)
    assert_same(got, expected(checkpoint), strides=False)
    assert np.shares_memory(got["ema_net"]["fc.weight"], got["ema_net"]["head"])
    assert got["every_dtype"]["bfloat16"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("advice", ["taken", "refused", "missing"])
def test_big_records_go_out_piece_by_piece_with_their_write_back_started(
    tmp_path, monkeypatch, advice
) -> None:
    """Pieces CRC'd one after another (zipfile checks the CRCs), and the write-back of every
    ``_WRITE_BACK`` bytes started, in order; advice that is refused or missing (no
    ``posix_fadvise``) changes nothing in the file."""
    asked: list[tuple[int, int, int]] = []

    def fadvise(fd: int, offset: int, length: int, what: int) -> None:
        asked.append((offset, length, what))
        if advice == "refused":
            raise OSError(22, "Invalid argument")

    if advice == "missing":
        monkeypatch.delattr(os, "posix_fadvise", raising=False)
    else:
        monkeypatch.setattr(os, "posix_fadvise", fadvise)
    path, checkpoint = write_in_small_pieces(tmp_path, monkeypatch)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert z.read("ckpt/data/0") == checkpoint["w"].tobytes()
    assert_same(interop.read_checkpoint(path), checkpoint)
    if advice != "missing":
        assert [what for _, _, what in asked] == [os.POSIX_FADV_DONTNEED] * len(asked)
        ends = [offset + length for offset, length, _ in asked]
        assert [offset for offset, _, _ in asked] == [0, *ends[:-1]]
        assert all(length >= 4096 for _, length, _ in asked)
        assert ends[-1] <= path.stat().st_size


class Version(str):
    """A str subclass (as ``torch.__version__`` is): torch.load would refuse its class."""


@pytest.mark.parametrize(
    ("checkpoint", "key"),
    [
        ({"net": {"w": np.ones(2)}, "bad": object()}, "bad"),
        ({"net": {"w": np.ones(2), "hook": lambda x: x}}, "hook"),
        ({"opt": {"state": [1, {"fn": print}]}}, "fn"),
        ({"w": np.array(["a", "b"])}, "w"),
        ({"w": np.array([None], dtype=object)}, "w"),
        ({"when": np.array(["2020-01-01"], dtype="datetime64[D]")}, "when"),
        ({"w": np.arange(3, dtype=">f4")}, "w"),  # would read back byte-swapped
        ({"acc": np.float32(0.5)}, "acc"),  # torch.load(weights_only=True) refuses these
        ({"f": frozenset({1})}, "f"),
        ({"s": slice(1, 2)}, "s"),
        ({"v": Version("2.13")}, "v"),
    ],
)
def test_a_value_it_cannot_represent_is_a_type_error_naming_its_key(
    tmp_path, checkpoint, key
) -> None:
    with pytest.raises(TypeError, match=repr(key)):
        interop.write_checkpoint(tmp_path / "ckpt.pth", checkpoint)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.pth"
    old.write_bytes(b"old")
    with pytest.raises(TypeError, match=repr(key)):
        interop.write_checkpoint(old, checkpoint)
    assert [p.name for p in tmp_path.iterdir()] == ["old.pth"] and old.read_bytes() == b"old"


@pytest.mark.parametrize("mmap", [False, True])
def test_more_than_256_entries_load_in_torch(torch, tmp_path, mmap) -> None:
    """Past 256 memo entries the pickle needs LONG_BINPUT/LONG_BINGET."""
    rng = np.random.default_rng(8)
    checkpoint = {f"layer{i}.weight": random_array(rng, np.float32, (2,)) for i in range(300)}
    path = tmp_path / "many.pth"
    interop.write_checkpoint(path, checkpoint)
    assert_same(from_torch(torch.load(path, weights_only=True, mmap=mmap)), checkpoint)
    assert_same(interop.read_checkpoint(path), checkpoint)


def test_a_failing_write_leaves_nothing(tmp_path) -> None:
    """A write cut short by the file size limit (as a full disk cuts it): no file, no leftover
    temporary file; an old file keeps its bytes."""
    fresh, old = tmp_path / "fresh.pth", tmp_path / "old.pth"
    old.write_bytes(b"old")
    big = {"w": np.ones(1 << 20, np.float32)}

    def attempt() -> str:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )
        outcomes = []
        for path in (fresh, old):
            try:
                interop.write_checkpoint(path, big)
                outcomes.append("written")
            except OSError as e:
                outcomes.append(f"OSError naming it: {str(path) in str(e)}")
        return " | ".join(outcomes)

    assert in_child(attempt) == "OSError naming it: True | OSError naming it: True"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.pth"]
    assert old.read_bytes() == b"old"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_read_only_target_is_refused(shared_folder) -> None:
    path = shared_folder / "ckpt.pth"

    def attempt() -> str:
        path.write_bytes(b"old")
        path.chmod(0o444)
        try:
            interop.write_checkpoint(path, {"w": np.ones(2)})
        except PermissionError as e:
            return f"PermissionError naming it: {str(path) in str(e)} | {path.read_bytes()!r}"
        return "written"

    assert as_normal_user(attempt) == "PermissionError naming it: True | b'old'"
    assert sorted(p.name for p in shared_folder.iterdir()) == [path.name]


NEVER_TORCH = """
import sys
import numpy as np
import interop
interop.write_checkpoint(sys.argv[1], {"w": np.ones(3, np.float32), "epoch": 1})
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok")
"""


def test_writing_never_imports_torch(tmp_path) -> None:
    root = pathlib.Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NEVER_TORCH), str(tmp_path / "ckpt.pth")],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert done.stdout.strip() == "ok", done.stderr
