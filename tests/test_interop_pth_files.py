""".pth files read and written with numpy alone (no PyTorch): what ``write_checkpoint`` writes
``read_checkpoint`` reads back bit for bit, ties and strides kept, memory-mapped and
read-only; the zip layout is ``torch.save``'s; copies renamed, re-zipped deflated or in big-endian
order read the same; views of one buffer are written as one storage; inconsistent or hostile
files (globals that run code, refused opcodes, tensors lying about their storage) and values that
cannot be written are refused naming the file or key, and nothing from a file runs."""

from __future__ import annotations

import errno
import os
import pathlib
import re
import struct
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import interop
import interop._pth
from interop._dtypes import all_dtypes
from interop._pickle import Tensor, dump
from tests.test_pickle import HOSTILE

SEEDS = pathlib.Path(__file__).parent / "data" / "interop_bad" / "seeds"
DTYPES = [d for d in all_dtypes()]


def _array(draw, dtype: np.dtype) -> np.ndarray:
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    raw = draw(st.binary(min_size=dtype.itemsize * int(np.prod(shape))))
    array = np.frombuffer(raw[: dtype.itemsize * int(np.prod(shape))], np.uint8).copy()
    array = array.view(dtype).reshape(shape)
    if array.ndim >= 2 and draw(st.booleans()):
        array = array.T  # a transposed view: written as its memory with strides
    return array


@st.composite
def state_dicts(draw):
    arrays = [_array(draw, draw(st.sampled_from(DTYPES))) for _ in range(draw(st.integers(1, 4)))]
    keys = draw(st.lists(st.text("abc.", min_size=1, max_size=5), min_size=len(arrays) + 1,
                         max_size=len(arrays) + 1, unique=True))  # fmt: skip
    out = OrderedDict(zip(keys, arrays, strict=False))
    out[keys[-1]] = arrays[0]  # a tie: one array under two keys
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@given(state_dicts())
def test_what_write_checkpoint_writes_reads_back_bit_exact_with_its_ties(tmp_path_factory, sd):
    path = tmp_path_factory.mktemp("rt") / "ckpt.pth"
    interop.write_checkpoint(path, {"net": sd, "epoch": 3, "acc": 0.5})
    back = interop.read_checkpoint(path)
    assert back["epoch"] == 3 and back["acc"] == 0.5 and list(back["net"]) == list(sd)
    for key, array in sd.items():
        got = back["net"][key]
        assert _same(got, array) and not got.flags.writeable, key
        if array.size > 1 and array.strides != np.ascontiguousarray(array).strides:
            assert got.strides == array.strides  # a transposed view stays one
    first, last = list(sd)[0], list(sd)[-1]
    assert back["net"][first] is back["net"][last]


def test_arrays_are_read_only_views_of_the_mapped_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    interop.write_checkpoint(path, {"w": w, "wt": w.T})
    back = interop.read_checkpoint(path)
    assert not back["w"].flags.writeable and not back["w"].flags.owndata
    assert _same(back["wt"], w.T)
    with pytest.raises(ValueError, match="read-only"):
        back["w"][0, 0] = 1


def test_the_zip_layout_is_torch_saves(tmp_path):
    path = tmp_path / "ckpt_best.pth"
    interop.write_checkpoint(path, {"a": np.ones(3, np.float32), "b": np.zeros(2, np.int64)})
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC right
        infos = archive.infolist()
    assert [i.filename for i in infos] == [
        f"ckpt_best/{name}"
        for name in (
            "data.pkl",
            ".format_version",
            ".storage_alignment",
            "byteorder",
            "data/0",
            "data/1",
            "version",
            ".data/serialization_id",
        )  # fmt: skip
    ]
    data = path.read_bytes()
    for info in infos:
        assert info.compress_type == zipfile.ZIP_STORED
        names, extra = np.frombuffer(data[info.header_offset + 26 : info.header_offset + 30], "<u2")
        assert (info.header_offset + 30 + int(names) + int(extra)) % 64 == 0, info.filename
    with zipfile.ZipFile(path) as archive:
        assert archive.read("ckpt_best/byteorder") == b"little"
        assert archive.read("ckpt_best/version") == b"3\n"


def _rezip(source: pathlib.Path, target: pathlib.Path, folder: str, change=None, **options):
    """A copy of a .pth archive with another folder name, each record passed through
    ``change(name, bytes)``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", **options) as new:
        for info in old.infolist():
            name = info.filename.partition("/")[2]
            content = old.read(info)
            new.writestr(f"{folder}/{name}", change(name, content) if change else content)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_copies_renamed_or_deflated_read_the_same(tmp_path, compression):
    for seed in ("sections.pth",):  # written by torch.save
        want = interop.read_checkpoint(SEEDS / seed)
        copy = tmp_path / "renamed.pth"
        _rezip(SEEDS / seed, copy, "some_other_name", compression=compression)
        got = interop.read_checkpoint(copy)
        for section in ("net", "ema_net"):
            for key, array in want[section].items():
                assert _same(got[section][key], array), (section, key)
                assert not got[section][key].flags.writeable


def test_legacy_and_zip_files_torch_wrote_read_the_same():
    zipped = interop.read_checkpoint(SEEDS / "sections.pth")
    legacy = interop.read_checkpoint(SEEDS / "sections_legacy.pth")
    assert legacy["epoch"] == zipped["epoch"] and list(legacy["net"]) == list(zipped["net"])
    for key, array in zipped["net"].items():
        assert _same(legacy["net"][key], array), key


def test_a_big_endian_file_reads_in_native_order(tmp_path):
    values = {
        "f": np.array([1.5, -2.0, np.pi], np.float32),
        "c": np.array([1 - 2j, 3.5j], np.complex64),
        "h": np.array([1.5, -3.0], ml_dtypes.bfloat16),
        "i": np.array([[1, -2], [3, 2**40]], np.int64).T,
    }
    little = tmp_path / "little.pth"
    interop.write_checkpoint(little, values)
    keys = {name: f"data/{i}" for i, name in enumerate(values)}

    def swap(name, content):
        if name == "byteorder":
            return b"big"
        for key, record in keys.items():
            if name == record:
                dtype = values[key].dtype
                part = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
                return np.frombuffer(content, f"<u{part}").astype(f">u{part}").tobytes()
        return content

    big = tmp_path / "big.pth"
    _rezip(little, big, "big", swap)
    back = interop.read_checkpoint(big)
    for key, array in values.items():
        assert _same(back[key], array), key


def test_big_endian_uint16_is_refused_as_torch_reads_it_unswapped(tmp_path):
    little = tmp_path / "little.pth"
    interop.write_checkpoint(little, {"u": np.arange(3, dtype=np.uint16)})
    big = tmp_path / "big.pth"
    _rezip(little, big, "big", lambda name, content: b"big" if name == "byteorder" else content)
    with pytest.raises(ValueError, match=r"big.pth is not a readable .* uint16 in a big-endian"):
        interop.read_checkpoint(big)


def test_a_record_shorter_than_its_storage_claims_is_refused(tmp_path):
    path = tmp_path / "ckpt.pth"
    interop.write_checkpoint(path, {"w": np.ones(4, np.float32)})
    short = tmp_path / "short.pth"
    _rezip(path, short, "short", lambda name, content: content[:8] if name == "data/0" else content)
    with pytest.raises(ValueError) as e:
        interop.read_checkpoint(short)
    assert str(e.value).startswith(f"{short} is not a readable PyTorch checkpoint (storage '0' ")
    assert "claims 16 bytes, record data/0 holds 8" in str(e.value)


@pytest.mark.parametrize("broken", [None, [np.zeros(2, np.float32)], np.zeros(2, np.float32)])
@pytest.mark.parametrize("which", ["auto", "ema_net"])
def test_an_ema_net_that_is_not_a_state_dict_is_refused_naming_file_and_type(
    tmp_path, broken, which
):
    path = tmp_path / "ckpt.pth"
    net = {"fc.weight": np.ones((3, 2), np.float32), "fc.bias": np.zeros(3, np.float32)}
    interop.write_checkpoint(path, {"net": net, "ema_net": broken, "epoch": 1})
    template = {"params": {"fc": {"kernel": np.zeros((2, 3), np.float32),
                                  "bias": np.zeros(3, np.float32)}}}  # fmt: skip
    kind = "list" if isinstance(broken, list) else type(broken).__name__
    with pytest.raises(ValueError, match=f"^{path}: 'ema_net' is a {kind}, not a state_dict"):
        interop.load_checkpoint(path, template, which=which)


@pytest.mark.parametrize(
    ("obj", "where"),
    [
        ({"net": {"w": np.ones(2)}, "opt": {"state": [object()]}}, "['opt']['state'][0]"),
        ({"acc": np.float64(0.5)}, "['acc'] (a numpy float64 scalar)"),
        ({"w": np.ones(2, np.dtype("U3"))}, "['w']: unsupported array dtype <U3"),
    ],
)
def test_what_cannot_be_written_is_named_and_nothing_is_written(tmp_path, obj, where):
    with pytest.raises(TypeError, match="^" + re.escape(f"cannot store {where}")):
        interop.write_checkpoint(tmp_path / "ckpt.pth", obj)
    assert list(tmp_path.iterdir()) == []


def test_write_checkpoint_does_not_write_safetensors(tmp_path):
    with pytest.raises(ValueError, match="use save_checkpoint"):
        interop.write_checkpoint(tmp_path / "ckpt.safetensors", {"w": np.ones(2)})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_path_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    interop.write_checkpoint(path, {"w": np.ones(2, np.float32)})
    before = path.read_bytes()

    def half_then_fail(temp, *args):
        pathlib.Path(temp).write_bytes(b"PK\x03\x04half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), temp)

    monkeypatch.setattr(interop._pth, "_write_zip", half_then_fail)
    with pytest.raises(OSError) as e:
        interop.save_checkpoint(path, net={"params": {"fc": {"bias": np.zeros(2, np.float32)}}})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pth"]


def test_an_empty_file_is_named(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"^{path} is not a readable PyTorch checkpoint"):
        interop.read_checkpoint(path)


def _with_pickle(tmp_path: pathlib.Path, pickle: bytes) -> pathlib.Path:
    """A file ``write_checkpoint`` wrote (one float32 storage of 6 elements, ``data/0``) with
    its ``data.pkl`` replaced."""
    good = tmp_path / "good.pth"
    interop.write_checkpoint(good, {"w": np.arange(6, dtype=np.float32)})
    path = tmp_path / "hostile.pth"
    _rezip(good, path, "hostile", lambda name, content: pickle if name == "data.pkl" else content)
    return path


def _readers(template=None):
    template = template or {"params": {"fc": {"bias": np.zeros(6, np.float32)}}}
    return [interop.read_checkpoint, interop.inspect_checkpoint,
            lambda p: interop.load_checkpoint(p, template)]  # fmt: skip


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pickles_in_a_file_are_refused_naming_it(tmp_path, name):
    data, message = HOSTILE[name]
    path = _with_pickle(tmp_path, data)
    for read in _readers():
        with pytest.raises(ValueError) as e:
            read(path)
        assert str(e.value).startswith(str(path)) and message in str(e.value), e.value


@pytest.mark.parametrize("legacy", [False, True])
def test_a_file_calling_os_system_is_refused_and_nothing_runs(tmp_path, legacy):
    marker = tmp_path / "ran"
    command = f"touch {marker}".encode()
    runs = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
    if legacy:  # the legacy format's five pickles, the object pickle the one that runs
        path = tmp_path / "legacy.pth"
        head = [dump(x, lambda v, w: None) for x in (0x1950A86A20F9469CFC6C, 1001, {})]
        path.write_bytes(b"".join(head) + runs + dump([], lambda v, w: None))
    else:
        path = _with_pickle(tmp_path, runs)
    for read in _readers():
        with pytest.raises(ValueError, match="^" + re.escape(f"{path} needs globals")) as e:
            read(path)
        assert "os.system" in str(e.value)
    assert not marker.exists()


def _tensor_pickle(offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> bytes:
    storage = np.empty(6, np.float32)  # what data/0 holds
    return dump({"w": storage}, lambda value, where: Tensor("0", storage, offset, shape, strides))


@pytest.mark.parametrize(
    ("offset", "shape", "strides", "message"),
    [
        (5, (2,), (1,), "needs 7 elements of storage '0', which holds 6 of float32"),
        (0, (2, 3), (3, 2), "needs 8 elements of storage '0'"),
        (0, (4, 2), (1, 2**40), "needs 1,099,511,627,780 elements"),
        (-1, (2,), (1,), "negative numbers, which torch refuses too"),
        (3, (2,), (-1,), "negative numbers, which torch refuses too"),
        (0, (-2,), (1,), "negative numbers"),
        (0, (2, 3), (1,), "do not match"),
    ],
)
def test_tensors_lying_about_their_storage_are_refused(tmp_path, offset, shape, strides, message):
    path = _with_pickle(tmp_path, _tensor_pickle(offset, shape, strides))
    for read in _readers():
        with pytest.raises(ValueError) as e:
            read(path)
        assert str(e.value).startswith(f"{path} is not a readable PyTorch checkpoint")
        assert message in str(e.value)


def test_a_tensor_that_fits_its_storage_is_read_as_it_says(tmp_path):
    path = _with_pickle(tmp_path, _tensor_pickle(1, (2, 2), (1, 3)))
    got = interop.read_checkpoint(path)["w"]
    assert _same(got, np.arange(6, dtype=np.float32)[[[1, 4], [2, 5]]])
    assert got.strides == (4, 12)


def test_views_of_one_buffer_are_written_as_one_storage_and_read_back_as_views(tmp_path):
    path = tmp_path / "views.pth"
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    views = {"base": base, "row": base[2], "t": base.T, "col": base[:, 1]}
    views |= {"wide": np.broadcast_to(np.arange(3, dtype=np.int64), (1000, 3))}
    interop.write_checkpoint(path, views)
    with zipfile.ZipFile(path) as archive:
        sizes = {i.filename: i.file_size for i in archive.infolist() if "/data/" in i.filename}
    assert sizes == {"views/data/0": 96, "views/data/1": 24}  # the broadcast: its 3 elements
    back = interop.read_checkpoint(path)
    for key, array in views.items():
        assert _same(back[key], array) and back[key].strides == array.strides, key
    assert np.shares_memory(back["row"], back["t"])
    again = tmp_path / "again.pth"
    interop.write_checkpoint(again, back)
    assert again.stat().st_size == path.stat().st_size


def test_views_far_apart_in_one_buffer_are_written_as_copies(tmp_path):
    path = tmp_path / "apart.pth"
    big = np.arange(1_000_000, dtype=np.float32)
    interop.write_checkpoint(path, {"head": big[:2], "tail": big[-2:], "every": big[::100_000]})
    with zipfile.ZipFile(path) as archive:
        sizes = [i.file_size for i in archive.infolist() if "/data/" in i.filename]
    assert sizes == [8, 8, 40]
    back = interop.read_checkpoint(path)
    assert _same(back["tail"], big[-2:]) and _same(back["every"], big[::100_000])
