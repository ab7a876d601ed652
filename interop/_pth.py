"""``torch.save`` files (``.pth``) <-> numpy arrays, without PyTorch.

Reading: the zip format (records under any one folder, stored ones memory-mapped at their
local header's data offset, deflated ones read into a copy, the ``byteorder`` record
honoured) and the legacy format (``_use_new_zipfile_serialization=False``). Every tensor is a
read-only view of its storage's bytes, made only after its offset, sizes and strides are checked
to fit them (negative strides refused, as torch does), so tensors sharing a storage share one
buffer. Writing: the zip layout ``torch.save`` writes, byte for byte in structure (protocol 2,
64-byte aligned stored records, CRCs in the central directory), so ``torch.load`` reads it with
and without ``mmap=True``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from interop._dtypes import as_numpy, is_array
from interop._files import first_line, io_failure, write_atomic
from interop._pickle import Refused, StorageId, Tensor, dump, load

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ALIGNMENT = 64
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand past about 1032:1
_ZIP32_LIMIT = 0xFFFFFFFF
_CHUNK = 1 << 20  # bytes CRC'd and written at a time
_WRITE_BACK = 16 << 20  # bytes written before their write-back to the disk is started


class _Storage(NamedTuple):
    dtype: np.dtype
    typed: bool
    key: str
    data: np.ndarray  # its bytes, uint8, read-only; in native byte order for typed storages


def read_pth(path: str | os.PathLike[str]) -> Any:
    """Reads a ``torch.save`` file as ``torch.load(weights_only=True)`` does, with numpy arrays
    for tensors, never importing PyTorch.

    Arrays are read-only: stored records are memory-mapped (zero-copy); deflated records,
    big-endian files and tensors with the conj or neg bit are copies. ``torch.Size`` is a
    tuple, ``Parameter`` its array, ``torch.device`` a string such as ``"cuda:0"``.

    Args:
      path: a ``torch.save`` file (zip or legacy format).

    Returns:
      What it holds.

    Raises:
      OSError: naming the file when it cannot be read.
      ValueError: naming the file and what is wrong when it is not a ``torch.save`` file, is
        truncated or inconsistent, or needs globals safe loading refuses (naming them).

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     write_pth(path, {"net": {"fc.bias": np.zeros(2, np.float32)}, "epoch": 3})
      ...     read_pth(path)
      {'net': {'fc.bias': array([0., 0.], dtype=float32)}, 'epoch': 3}
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise _unreadable(path, "an empty file")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if data[:4] == b"PK\x03\x04":
                return _read_zip(path, f, data)
    except OSError as e:
        raise io_failure(path, e) or _unreadable(path, first_line(e)) from e
    if data[:3] == b"\x80\x02\x8a":
        return _read_legacy(path, data)
    raise _unreadable(path, "neither torch.save's zip nor its legacy format")


def _unreadable(path: str, reason: str) -> ValueError:
    return ValueError(f"{path} is not a readable PyTorch checkpoint ({reason})")


def _read_zip(path: str, file: BinaryIO, data: mmap.mmap) -> Any:
    try:
        archive = zipfile.ZipFile(file)
        infos = archive.infolist()
    except Exception as e:  # zipfile fails in many ways on a damaged directory
        raise _unreadable(path, f"a damaged zip archive: {first_line(e)}") from None
    pickles = [i.filename for i in infos if i.filename.endswith("/data.pkl")]
    folders = {name[: -len("data.pkl")] for name in pickles if name.count("/") == 1}
    if len(folders) != 1:
        raise _unreadable(path, f"expected one <folder>/data.pkl record, found {pickles[:5]}")
    folder = folders.pop()
    records = {i.filename[len(folder) :]: i for i in infos if i.filename.startswith(folder)}
    read = _RecordReader(archive, data)
    try:
        order = bytes(read(records["byteorder"])) if "byteorder" in records else b"little"
    except Refused as e:
        raise _unreadable(path, str(e)) from None
    if order not in (b"little", b"big"):
        raise _unreadable(path, f"its byteorder record says {order[:20]!r}")
    big = order == b"big"
    storages: dict[str, _Storage] = {}

    def storage(pid: StorageId) -> _Storage:
        if pid.key not in storages:
            record = records.get(f"data/{pid.key}")
            if record is None:
                raise Refused(f"storage {pid.key!r} has no record data/{pid.key}")
            raw = _claimed(pid, read(record), f"record data/{pid.key}")
            storages[pid.key] = _storage(pid, raw, big)
        return storages[pid.key]

    with archive:
        try:
            pickle = bytes(read(records["data.pkl"]))
        except Refused as e:
            raise _unreadable(path, str(e)) from None
        return load(pickle, path, storage, _tensor_maker(big))[0]


class _RecordReader:
    """A zip record's bytes: a view of the mapped file when stored, a copy when deflated."""

    def __init__(self, archive: zipfile.ZipFile, data: mmap.mmap) -> None:
        self.archive, self.data = archive, data

    def __call__(self, info: zipfile.ZipInfo) -> np.ndarray:
        name, size = info.filename, info.file_size
        if info.compress_type == zipfile.ZIP_DEFLATED:
            if size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
                raise Refused(f"record {name} claims {size:,} bytes inflated")
            try:
                with self.archive.open(info) as f:
                    raw = f.read(size + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise Refused(f"record {name}: {first_line(e)}") from None
            if len(raw) != size:
                raise Refused(f"record {name} inflates to {len(raw):,} bytes")
            return np.frombuffer(raw, np.uint8)
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != size:
            raise Refused(f"record {name} is compressed as torch never writes")
        header = self.data[info.header_offset : info.header_offset + 30]
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise Refused(f"record {name} has no local header")
        names, extra = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + names + extra
        if start + size > len(self.data):
            raise Refused(f"record {name} runs past the end of the file")
        return np.frombuffer(self.data, np.uint8, count=size, offset=start)


def _read_legacy(path: str, data: mmap.mmap) -> Any:
    """The legacy format: magic, protocol, sys_info, the object pickle, its storage keys, then
    per key an int64 element count and the raw bytes."""
    magic, end = load(data, path, _no_storage, _no_tensor)
    protocol, end = load(data, path, _no_storage, _no_tensor, end)
    info, end = load(data, path, _no_storage, _no_tensor, end)
    if magic != _LEGACY_MAGIC or protocol != 1001 or not isinstance(info, dict):
        raise _unreadable(path, "not torch.save's legacy format (magic number or version)")
    little = info.get("little_endian", True)
    if not isinstance(little, bool):
        raise _unreadable(path, f"its sys_info says little_endian={little!r:.20}")
    found: dict[str, StorageId] = {}
    start = end

    def note(pid: StorageId) -> StorageId:
        return found.setdefault(pid.key, pid)

    _, end = load(data, path, note, lambda *_: np.empty(0), start)
    keys, end = load(data, path, _no_storage, _no_tensor, end)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _unreadable(path, "its list of storage keys is not a list of strings")
    storages: dict[str, _Storage] = {}
    for key in keys:
        if key not in found or key in storages:
            raise _unreadable(path, f"storage key {key!r} is unknown or listed twice")
        count = int.from_bytes(data[end : end + 8], "little" if little else "big")
        pid = found[key]
        if len(data) < end + 8 or count != pid.numel:
            raise _unreadable(path, f"storage {key!r} holds {count:,} elements, not {pid.numel:,}")
        raw = np.frombuffer(data, np.uint8, count=len(data) - end - 8, offset=end + 8)
        try:
            raw = _claimed(pid, raw, f"the file after storage {key!r}'s size")
        except Refused as e:
            raise _unreadable(path, str(e)) from None
        storages[key] = _storage(pid, raw, not little)
        end += 8 + raw.size
    missing = sorted(set(found) - set(storages))
    if missing:
        raise _unreadable(path, f"storages {missing[:5]} have no data")
    return load(data, path, lambda pid: storages[pid.key], _tensor_maker(not little), start)[0]


def _no_storage(pid: StorageId) -> Any:
    raise Refused(f"storage {pid.key!r} where the format has none")


def _no_tensor(*_: Any) -> Any:
    raise Refused("a tensor where the format has none")


def _claimed(pid: StorageId, raw: np.ndarray, where: str) -> np.ndarray:
    """The bytes a persistent id claims, checked to be there."""
    size = pid.numel * pid.dtype.itemsize
    if raw.size < size:
        raise Refused(f"storage {pid.key!r} claims {size:,} bytes, {where} holds {raw.size:,}")
    return raw[:size]


def _storage(pid: StorageId, raw: np.ndarray, big: bool) -> _Storage:
    if big and pid.typed and pid.dtype.itemsize > 1:
        raw = _swapped(raw, pid.dtype)
    return _Storage(pid.dtype, pid.typed, pid.key, raw)


def _swapped(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Big-endian bytes in native order, swapped per element (per part for complex)."""
    part = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    out = raw.view(f"u{part}").byteswap().view(np.uint8)
    out.flags.writeable = False
    return out


def _tensor_maker(big: bool) -> Callable[..., np.ndarray]:
    """Makes each tensor a read-only view of its storage, once it is checked to fit."""

    def tensor(
        storage: _Storage,
        offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        dtype: np.dtype | None,
    ) -> np.ndarray:
        dtype = storage.dtype if dtype is None else dtype
        where = f"a tensor of size {size}, stride {stride} and offset {offset}"
        if big and not storage.typed and dtype.itemsize > 1:
            raise Refused(
                f"{where} is {dtype} in a big-endian file, which torch reads unswapped; "
                "convert the file on a big-endian machine"
            )
        if offset < 0 or min(size + stride, default=0) < 0:
            raise Refused(f"{where}: negative numbers, which torch refuses too")
        items = storage.data.size // dtype.itemsize
        if 0 in size:
            extent = 0
        else:
            extent = offset + 1 + sum(s * (n - 1) for n, s in zip(size, stride, strict=True))
        if extent > items:
            raise Refused(
                f"{where} needs {extent:,} elements of storage {storage.key!r}, which holds "
                f"{items:,} of {dtype}"
            )
        if extent == 0:
            empty = np.zeros(size, dtype)
            empty.flags.writeable = False
            return empty
        # as_strided goes through __array_interface__, which cannot name ml_dtypes' dtypes:
        # it views their same-width unsigned integers, then the result is viewed back.
        carrier = dtype if dtype.isbuiltin == 1 else np.dtype(f"u{dtype.itemsize}")
        elements = storage.data[: items * dtype.itemsize].view(carrier)[offset:]
        strides = tuple(s * dtype.itemsize for s in stride)
        try:
            view = np.lib.stride_tricks.as_strided(elements, size, strides, writeable=False)
        except ValueError as e:  # more elements than numpy can index
            raise Refused(f"{where}: {first_line(e)}") from None
        return view if carrier is dtype else view.view(dtype)

    return tensor


def write_pth(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as ``torch.save`` would, without PyTorch, atomically (``write_atomic``).

    numpy and jax arrays (and tensors, when PyTorch is there) become tensors of their dtype and
    shape (0-d kept); one array object under several keys becomes one tensor (one storage), as
    ``torch.save`` writes tied weights. Arrays of one dtype viewing one buffer (what
    ``read_pth`` returns for tensors sharing a storage) share one storage, as ``torch.save``
    writes views of one tensor, when the bytes they span are no more than theirs together; a
    transposed or broadcast array is written as the memory it views, with its strides, without
    a copy; any other array as a contiguous copy.

    Args:
      path: the file to write.
      obj: dicts, ``OrderedDict`` (with its ``_metadata``), lists, tuples, sets, str, bytes,
        int, float, complex, bool, None and arrays, nested.

    Raises:
      TypeError: naming the key path of a value ``torch.load(weights_only=True)`` would not
        read back (e.g. ``object()``, a numpy scalar: pass ``float(x)`` or ``np.asarray(x)``),
        or an array of a dtype outside the table; before anything is written.
      OSError: when the file cannot be written; ``path`` is then untouched.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     write_pth(path, {"w": np.ones((2, 3), np.float32).T, "epoch": 1})
      ...     read_pth(path)["w"].strides
      (4, 12)
    """
    arrays: list[np.ndarray] = []

    def collect(value: Any, where: str) -> Tensor | None:
        array = _array_to_write(value, where)
        if array is not None:
            arrays.append(array)
            return Tensor("0", np.empty(0, array.dtype), 0, array.shape, array.strides)
        return None

    dump(obj, collect)  # every array first, so views of one buffer can share one storage
    planned = _plan(arrays)
    blocks: list[np.ndarray] = []
    keys: dict[int, str] = {}
    calls = iter(zip(arrays, planned, strict=True))

    def tensor(value: Any, _: str) -> Tensor | None:
        if not is_array(value):
            return None
        array, (block, offset, strides) = next(calls)
        if id(block) not in keys:
            keys[id(block)] = str(len(blocks))
            blocks.append(block)
        return Tensor(keys[id(block)], block, offset, array.shape, strides)

    pickle = dump(obj, tensor)
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    folder = stem if stem.isprintable() and stem.isascii() and stem else "archive"
    write_atomic(path, lambda temp: _write_zip(temp, folder, pickle, blocks))


def _array_to_write(value: Any, where: str) -> np.ndarray | None:
    """The numpy array of an array or tensor to write, None for another value."""
    if not is_array(value):
        if isinstance(value, np.generic):
            raise TypeError(
                f"cannot store {where} (a numpy {value.dtype} scalar): torch.load("
                "weights_only=True) refuses numpy scalars; pass float(x), int(x) or "
                "np.asarray(x)"
            )
        return None
    try:
        return as_numpy(value)
    except TypeError as e:
        raise TypeError(f"cannot store {where}: {e}") from None


class _Span(NamedTuple):
    """Where an array's elements lie in the bytes of the buffer that holds them."""

    owner: int  # id of the object owning the buffer
    raw: np.ndarray  # the buffer's bytes, uint8
    start: int  # the array's lowest byte
    end: int  # one past its highest byte


def _span(array: np.ndarray) -> _Span | None:
    """The span of an array in its owner's buffer; None where there is none to share (no
    elements, negative or odd strides, an owner that exports no contiguous buffer)."""
    itemsize = array.itemsize
    if array.size == 0 or any(s < 0 or s % itemsize for s in array.strides):
        return None
    owner: Any = array
    top = array  # the last ndarray on the way, for an owner without a buffer (a tensor)
    while getattr(owner, "base", None) is not None:  # ndarrays, as_strided's DummyArray
        owner = owner.base
        top = owner if isinstance(owner, np.ndarray) else top
    raw = None
    if not isinstance(owner, np.ndarray):
        try:
            raw = np.frombuffer(owner, np.uint8)
        except (TypeError, ValueError, BufferError):
            owner = top
    if raw is None:
        if not (top.flags.c_contiguous or top.flags.f_contiguous):
            return None
        owner, raw = top, top.ravel(order="K").view(np.uint8)
    start = array.ctypes.data - raw.ctypes.data
    end = (
        start + itemsize + sum(s * (n - 1) for s, n in zip(array.strides, array.shape, strict=True))
    )
    if start < 0 or end > raw.size:
        return None
    return _Span(id(owner), raw, start, end)


def _plan(arrays: list[np.ndarray]) -> list[tuple[np.ndarray, int, tuple[int, ...]]]:
    """Each array's storage (1-d, its dtype), offset and strides in elements.

    Arrays of one dtype in one buffer share one storage, its bytes the span they cover, as
    ``torch.save`` writes views of one tensor, when that span is no larger than their own
    bytes together (never more written than copies would be). Else an array's own span, when
    it is no larger than the array (a transposed or broadcast view, written without a copy),
    else a contiguous copy.
    """
    spans = [_span(a) for a in arrays]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (array, span) in enumerate(zip(arrays, spans, strict=True)):
        if span is not None:
            groups.setdefault((span.owner, array.dtype, span.start % array.itemsize), []).append(i)
    planned: list[Any] = [None] * len(arrays)
    for members in groups.values():
        low = min(spans[i].start for i in members)  # type: ignore[union-attr]
        high = max(spans[i].end for i in members)  # type: ignore[union-attr]
        if high - low > sum(arrays[i].nbytes for i in members):
            continue
        block = spans[members[0]].raw[low:high].view(arrays[members[0]].dtype)  # type: ignore[union-attr]
        for i in members:
            planned[i] = _view_of(block, low, arrays[i], spans[i])
    for i, (array, span) in enumerate(zip(arrays, spans, strict=True)):
        if planned[i] is None and span is not None and span.end - span.start <= array.nbytes:
            planned[i] = _view_of(span.raw[span.start : span.end].view(array.dtype), span.start,
                                  array, span)  # fmt: skip
        elif planned[i] is None:
            planned[i] = _dense(array)
    return planned


def _view_of(
    block: np.ndarray, low: int, array: np.ndarray, span: Any
) -> tuple[np.ndarray, int, tuple[int, ...]]:
    itemsize = array.itemsize
    return block, (span.start - low) // itemsize, tuple(s // itemsize for s in array.strides)


def _dense(array: np.ndarray) -> tuple[np.ndarray, int, tuple[int, ...]]:
    """A contiguous copy of ``array`` (none when it is one), row-major strides in elements."""
    strides = [1] * array.ndim
    for axis in range(array.ndim - 2, -1, -1):
        strides[axis] = strides[axis + 1] * max(array.shape[axis + 1], 1)
    return np.ascontiguousarray(array).reshape(-1), 0, tuple(strides)


def _write_zip(temp: str, folder: str, pickle: bytes, blocks: list[np.ndarray]) -> None:
    records: list[tuple[str, bytes | memoryview]] = [
        ("data.pkl", pickle),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGNMENT).encode()),
        ("byteorder", sys.byteorder.encode()),
        *((f"data/{i}", b.view(np.uint8).data) for i, b in enumerate(blocks)),
        ("version", b"3\n"),
        (".data/serialization_id", f"{secrets.randbelow(10**40):040d}".encode()),
    ]
    with open(temp, "wb") as f:
        _ZipWriter(f)._write_all(folder, records)


class _ZipWriter:
    """The zip layout of ``torch.save`` (miniz): local headers with a padding extra field
    (``FB``) so each payload starts on a 64-byte boundary, zero CRC and sizes there and a data
    descriptor after the payload, the real ones in the central directory, zip64 end records.

    Payloads go out in pieces of ``_CHUNK`` bytes, each CRC'd just before it is written (one
    pass over memory, the piece still in the CPU's cache), and every ``_WRITE_BACK`` bytes the
    kernel is asked to start writing the file to the disk, so the disk works while the rest is
    copied and the final ``fsync`` has little left to wait for."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.pos, self.written_back = f, 0, 0
        self.central: list[bytes] = []

    def _put(self, data: bytes) -> None:
        self.f.write(data)
        self.pos += len(data)

    def _payload(self, data: bytes | memoryview) -> int:
        """Writes ``data`` (bytes, or a 1-d uint8 array's memory, not copied); its CRC32."""
        view, crc = memoryview(data), 0
        for start in range(0, len(view), _CHUNK):
            piece = view[start : start + _CHUNK]
            crc = zlib.crc32(piece, crc)
            self.f.write(piece)
            self.pos += len(piece)
            if self.pos - self.written_back >= _WRITE_BACK:
                self.f.flush()
                _start_write_back(self.f.fileno(), self.written_back, self.pos - self.written_back)
                self.written_back = self.pos
        return crc

    def _write_all(self, folder: str, records: list[tuple[str, bytes | memoryview]]) -> None:
        for name, data in records:
            self._record(f"{folder}/{name}".encode(), data)
        start, count = self.pos, len(self.central)
        for entry in self.central:
            self._put(entry)
        size, end = self.pos - start, self.pos
        self._put(struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x31E, 45, 0, 0, count, count,
                             size, start))  # fmt: skip
        self._put(struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1))
        self._put(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, min(count, 0xFFFF),
                             min(count, 0xFFFF), min(size, _ZIP32_LIMIT),
                             min(start, _ZIP32_LIMIT), 0))  # fmt: skip

    def _record(self, name: bytes, data: bytes | memoryview) -> None:
        size = len(data)
        offset = self.pos
        if max(size, offset) >= _ZIP32_LIMIT:
            raise OSError(f"records past 4 GiB need zip64 fields this writer does not write "
                          f"({name.decode()}: {size:,} bytes at {offset:,})")  # fmt: skip
        padding = -(offset + 30 + len(name) + 4) % _ALIGNMENT
        extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
        self._put(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 0, 0x808, 0, 0, 0, 0, 0, 0,
                             len(name), len(extra)) + name + extra)  # fmt: skip
        crc = self._payload(data)
        self._put(struct.pack("<4sIII", b"PK\x07\x08", crc, size, size))
        self.central.append(
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                0,
                0,
                0x808,
                0,
                0,
                0,
                crc,
                size,
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name  # fmt: skip
        )


def _start_write_back(fd: int, offset: int, length: int) -> None:
    """Starts the write-back of a written range of ``fd`` without waiting for it, as
    PostgreSQL does where ``sync_file_range`` is missing: ``POSIX_FADV_DONTNEED`` writes dirty
    pages back and drops only the clean ones, and pages being written back stay cached. Advice
    only: where it is missing or refused, the final ``fsync`` does the work."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def write_checkpoint(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes ``obj`` as a ``torch.save`` file without PyTorch (``write_pth``), which
    ``torch.load(path, weights_only=True)`` reads bit-exactly, with or without ``mmap=True``.

    Args:
      path: the file to write (not ``.safetensors``: ``save_checkpoint`` writes those).
      obj: a checkpoint: dicts, lists, tuples, sets, str, bytes, numbers, None and numpy or
        jax arrays (tensors too, when PyTorch is there), nested.

    Raises:
      ValueError: for a ``.safetensors`` path.
      TypeError: naming the key path of a value it cannot write, before anything is written.
      OSError: when the file cannot be written; ``path`` is then untouched.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.pth")
      ...     write_checkpoint(path, {"ema_net": {"w": np.ones(2, np.float32)}, "epoch": 7})
      ...     read_pth(path)["epoch"]
      7
    """
    if os.fspath(path).endswith(".safetensors"):
        raise ValueError(
            f"write_checkpoint writes torch.save files, not {os.fspath(path)}; use "
            "save_checkpoint for a safetensors file"
        )
    write_pth(path, obj)
