"""The ``torch.save`` pickle (protocol 2), read and written without PyTorch.

One table, ``_GLOBALS``, names every global the reader accepts and the writer writes, each
mapped to our own function: the reader never imports or looks up a module, so a global outside
the table (``os.system``, a numpy array, a class) is refused by name, and no code from a file
runs. The reader is a stack machine over the opcodes torch's own weights-only unpickler
allows (``torch/_weights_only_unpickler.py``); the others (``STACK_GLOBAL``, ``INST``,
``BINBYTES``, ``FRAME``, ...) are refused, as are lengths past the data's end and memo indices
past its size, before anything is allocated. ``BUILD`` only sets attributes on an
``OrderedDict`` (a state_dict's ``_metadata``) and a numpy dtype's byte order, as
``weights_only`` allows.

Numpy scalars (``numpy.core.multiarray.scalar``, as an ``acc`` metric SuperGradients saves):
``torch.load(weights_only=True)`` refuses them unless allowlisted; here they are decoded as
data (bool, integer, float and complex dtypes only) and come back as numpy scalars.
"""

from __future__ import annotations

import _compat_pickle
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from interop._dtypes import all_dtypes, numpy_dtype, storage_name, torch_name


class Refused(ValueError):
    """A pickle that is malformed or misuses an opcode; ``load`` adds the file and byte."""


class Unsafe(Refused):
    """A pickle that needs what safe loading does not allow (a global, an opcode)."""


@dataclass(frozen=True)
class StorageType:
    """A storage class a pickle names: typed (its dtype) or ``UntypedStorage`` (bytes)."""

    dtype: np.dtype
    typed: bool


@dataclass(frozen=True)
class TorchDtype:
    """A ``torch.<dtype>`` global: the numpy dtype holding its values."""

    dtype: np.dtype


class StorageId(NamedTuple):
    """A persistent id ``("storage", type, key, location, numel[, view_metadata])``."""

    dtype: np.dtype  # uint8 for UntypedStorage
    typed: bool
    key: str
    numel: int  # in elements of ``dtype``


class Tensor(NamedTuple):
    """A tensor for the writer: its storage's key and bytes, and its view of them."""

    key: str
    storage: np.ndarray  # the storage's elements, 1-d, of the tensor's dtype
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements


class _NumpyDtype:
    """``numpy.dtype(code, align, copy)`` as data: a numeric dtype, its byte order set by
    ``BUILD``."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if not (isinstance(code, str) and len(code) <= 4 and code[:1] in "biufc" and code):
            raise Refused(f"numpy dtype {code!r}: only bool, integer, float and complex")
        self.dtype = numpy_dtype(code)
        self.order = "="

    def _build(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and state[1] in ("<", ">", "|")):
            raise Refused(f"numpy dtype state {state!r:.80}: expected numpy's own")
        self.order = state[1]


def _numpy_scalar(dtype: Any, data: Any) -> np.generic:
    if not (isinstance(dtype, _NumpyDtype) and isinstance(data, bytes)):
        raise Refused("numpy scalar: expected a numeric dtype and its bytes")
    if len(data) != dtype.dtype.itemsize:
        raise Refused(f"numpy scalar: {len(data)} bytes for a {dtype.dtype}")
    value = np.frombuffer(data, dtype.dtype.newbyteorder(dtype.order))  # type: ignore[arg-type]
    return value.astype(dtype.dtype)[0]


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1", "utf-8", "utf8")):
        raise Refused(f"_codecs.encode: expected a str and latin1, got {encoding!r:.40}")
    return text.encode(encoding)


def _bytearray(*args: Any) -> bytearray:
    if args and not isinstance(args[0], bytes):
        args = (_encode(*args),)
    return bytearray(*args)


def _container(kind: type) -> Callable[..., Any]:
    def make(items: Any = ()) -> Any:
        if not isinstance(items, list | tuple | dict | OrderedDict | set):
            raise Refused(f"{kind.__name__}: expected a list or dict, got {type(items).__name__}")
        return kind(items)

    return make


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (real, imag)):
        raise Refused("complex: expected two numbers")
    return complex(real, imag)


def _size(dims: Any = ()) -> tuple[int, ...]:
    if not (isinstance(dims, tuple | list) and all(_is_int(d) for d in dims)):
        raise Refused("torch.Size: expected a tuple of ints")
    return tuple(dims)


def _device(kind: Any, index: Any = None) -> str:
    if not (isinstance(kind, str) and (index is None or _is_int(index))):
        raise Refused("torch.device: expected a name and an index")
    return kind if index is None else f"{kind}:{index}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Rebuild(NamedTuple):
    """A ``torch._utils._rebuild_*`` function, by name."""

    name: str


_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": _container(OrderedDict),
    "collections.Counter": _container(Counter),
    "builtins.set": _container(set),
    "builtins.complex": _complex,
    "builtins.bytearray": _bytearray,
    "_codecs.encode": _encode,
    "torch.Size": _size,
    "torch.device": _device,
    "numpy.dtype": _NumpyDtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    **{
        f"torch._utils.{name}": _Rebuild(name)
        for name in (
            "_rebuild_tensor",
            "_rebuild_tensor_v2",
            "_rebuild_tensor_v3",
            "_rebuild_parameter",
            "_rebuild_parameter_with_state",
        )
    },  # fmt: skip
    **{f"torch.{torch_name(dtype)}": TorchDtype(dtype) for dtype in all_dtypes()},
    **{f"torch.{storage_name(d)}": StorageType(d, True) for d in all_dtypes() if storage_name(d)},
    "torch.storage.UntypedStorage": StorageType(np.dtype(np.uint8), False),
}
_NAMES = {id(value): name for name, value in _GLOBALS.items()}

# Opcodes, as torch's weights-only unpickler allows them (all of protocol 2 but a few).
_OPS = {
    b"\x80": "PROTO", b".": "STOP", b"c": "GLOBAL", b"R": "REDUCE", b"b": "BUILD",
    b"a": "APPEND", b"e": "APPENDS", b"s": "SETITEM", b"u": "SETITEMS", b"(": "MARK",
    b"t": "TUPLE", b"\x85": "TUPLE1", b"\x86": "TUPLE2", b"\x87": "TUPLE3", b"N": "NONE",
    b"\x89": "NEWFALSE", b"\x88": "NEWTRUE", b")": "EMPTY_TUPLE", b"]": "EMPTY_LIST",
    b"}": "EMPTY_DICT", b"\x8f": "EMPTY_SET", b"J": "BININT", b"K": "BININT1",
    b"M": "BININT2", b"G": "BINFLOAT", b"X": "BINUNICODE", b"U": "SHORT_BINSTRING",
    b"Q": "BINPERSID", b"h": "BINGET", b"j": "LONG_BINGET", b"q": "BINPUT",
    b"r": "LONG_BINPUT", b"\x8a": "LONG1",
}  # fmt: skip


def global_name(module: str, name: str) -> str:
    """A pickle's ``GLOBAL module name`` as Python 3 spells it (``__builtin__.set`` is
    ``builtins.set``), as the unpickler's ``_compat_pickle`` mappings give it.

    Args:
      module, name: as the pickle has them.

    Returns:
      ``module.name``.

    Example:
      >>> global_name("__builtin__", "set")
      'builtins.set'
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def load(
    data: Any,
    path: str,
    storage: Callable[[StorageId], Any],
    tensor: Callable[[Any, int, tuple[int, ...], tuple[int, ...], np.dtype | None], Any],
    start: int = 0,
) -> tuple[Any, int]:
    """Reads one pickle from ``data`` without resolving any module.

    Args:
      data: bytes, or anything sliced and searched like them (an ``mmap``).
      path: the file, for error messages.
      storage: makes a storage from a persistent id (one call per persistent id).
      tensor: makes a tensor from ``(storage, offset, size, stride, dtype)``; ``dtype`` is
        None for a typed storage's own dtype.
      start: where the pickle begins.

    Returns:
      What it holds, and where it ends.

    Raises:
      ValueError: naming ``path``, for a pickle that is truncated, needs a global outside the
        table (naming all it needs), uses a refused opcode, or misuses an allowed one.

    Example:
      >>> load(b"\\x80\\x02]q\\x00(K\\x01X\\x01\\x00\\x00\\x00aq\\x01e.", "f.pth", None, None)
      ([1, 'a'], 18)
    """
    machine = _Machine(data, path, storage, tensor, start)
    try:
        return machine._run(), machine.pos
    except Unsafe as e:
        raise ValueError(f"{path} {e} (pickle byte {machine.op_at})") from None
    except Refused as e:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint ({e}, at pickle byte {machine.op_at})"
        ) from None
    except (IndexError, KeyError, TypeError, ValueError, struct.error, RecursionError) as e:
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (corrupt pickle at byte "
            f"{machine.op_at}: {type(e).__name__}: {str(e)[:100]})"
        ) from None


class _Machine:
    def __init__(self, data: Any, path: str, storage: Any, tensor: Any, start: int) -> None:
        self.data, self.path, self.pos, self.op_at, self.start = data, path, start, start, start
        self.storage, self.tensor = storage, tensor
        self.end = len(data)

    def _read(self, n: int) -> Any:
        if n > self.end - self.pos:
            raise Refused(f"truncated: {n:,} bytes claimed, {self.end - self.pos:,} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _line(self) -> str:
        found = self.data.find(b"\n", self.pos, min(self.end, self.pos + 256))
        if found < 0:
            raise Refused("truncated or overlong GLOBAL name")
        text = bytes(self.data[self.pos : found]).decode("utf-8")
        self.pos = found + 1
        return text

    def _run(self) -> Any:  # noqa: C901, PLR0912, PLR0915 (one opcode per branch, as pickle's)
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: dict[int, Any] = {}
        memo_limit = self.end - self.start  # more entries than bytes cannot be
        unpack = struct.unpack
        if bytes(self._read(2)) != b"\x80\x02":
            raise Unsafe("is not a protocol 2 pickle, which torch.save writes")
        while True:
            self.op_at = self.pos
            op = bytes(self._read(1))
            name = _OPS.get(op)
            if name is None:
                raise Unsafe(
                    f"uses pickle opcode {op!r}, which torch.load(weights_only=True) refuses too"
                )
            if name == "BINPUT" or name == "LONG_BINPUT":
                index = self._read(1)[0] if name == "BINPUT" else unpack("<I", self._read(4))[0]
                if index > memo_limit:
                    raise Refused(f"memo index {index:,} past the pickle's size")
                memo[index] = stack[-1]
            elif name == "BINGET" or name == "LONG_BINGET":
                index = self._read(1)[0] if name == "BINGET" else unpack("<I", self._read(4))[0]
                if index not in memo:
                    raise Refused(f"memo index {index} read before it is written")
                stack.append(memo[index])
            elif name == "BINUNICODE":
                size = unpack("<I", self._read(4))[0]
                stack.append(bytes(self._read(size)).decode("utf-8", "surrogatepass"))
            elif name == "BININT1":
                stack.append(self._read(1)[0])
            elif name == "MARK":
                marks.append(stack)
                stack = []
            elif name == "TUPLE":
                items, stack = stack, marks.pop()
                stack.append(tuple(items))
            elif name == "TUPLE1":
                stack[-1] = (stack[-1],)
            elif name == "TUPLE2":
                stack[-2:] = [(stack[-2], stack[-1])]
            elif name == "TUPLE3":
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "REDUCE":
                args = stack.pop()
                stack[-1] = self._call(stack[-1], args)
            elif name == "GLOBAL":
                full = global_name(self._line(), self._line())
                if full not in _GLOBALS:
                    raise Unsafe(self._refused_globals())
                stack.append(_GLOBALS[full])
            elif name == "BINPERSID":
                stack.append(self._persistent(stack.pop()))
            elif name == "NEWFALSE":
                stack.append(False)
            elif name == "NEWTRUE":
                stack.append(True)
            elif name == "NONE":
                stack.append(None)
            elif name == "SETITEMS":
                items, stack = stack, marks.pop()
                target = self._mapping(stack[-1], name)
                for i in range(0, len(items) - 1, 2):
                    target[items[i]] = items[i + 1]
                if len(items) % 2:
                    raise Refused("SETITEMS with an odd number of items")
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                self._mapping(stack[-1], name)[key] = value
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "APPENDS" or name == "APPEND":
                items = [stack.pop()] if name == "APPEND" else stack
                if name == "APPENDS":
                    stack = marks.pop()
                if type(stack[-1]) is not list:
                    raise Refused(f"{name} to a {type(stack[-1]).__name__}, not a list")
                stack[-1].extend(items)
            elif name == "EMPTY_SET":
                stack.append(set())
            elif name == "BININT":
                stack.append(unpack("<i", self._read(4))[0])
            elif name == "BININT2":
                stack.append(unpack("<H", self._read(2))[0])
            elif name == "LONG1":
                stack.append(int.from_bytes(self._read(self._read(1)[0]), "little", signed=True))
            elif name == "BINFLOAT":
                stack.append(unpack(">d", self._read(8))[0])
            elif name == "SHORT_BINSTRING":
                stack.append(bytes(self._read(self._read(1)[0])).decode("ascii"))
            elif name == "BUILD":
                state = stack.pop()
                self._build(stack[-1], state)
            elif name == "STOP":
                if marks or len(stack) != 1:
                    raise Refused("STOP with a MARK open or more than one value left")
                return stack[0]
            else:  # PROTO again, mid-stream
                raise Refused(f"{name} in the middle of a pickle")

    def _call(self, func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise Refused(f"REDUCE with {type(args).__name__} arguments, not a tuple")
        if isinstance(func, _Rebuild):
            return self._rebuild(func.name, args)
        if id(func) not in _NAMES or isinstance(func, StorageType | TorchDtype):
            raise Unsafe(f"calls a {type(func).__name__}, which safe loading does not call")
        return func(*args)

    def _rebuild(self, name: str, args: tuple[Any, ...]) -> Any:
        if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            if len(args) not in (3, 4) or not isinstance(args[0], np.ndarray):
                raise Refused(f"{name}: expected a tensor, requires_grad and hooks")
            return args[0]  # a Parameter's data; its Python attributes (``state``) are dropped
        dtype = None
        if name == "_rebuild_tensor_v3":
            if len(args) not in (7, 8) or not isinstance(args[6], TorchDtype):
                raise Refused(f"{name}: expected 7 or 8 arguments, the 7th a torch dtype")
            dtype, metadata = args[6].dtype, args[7] if len(args) == 8 else None
        elif name == "_rebuild_tensor_v2":
            if len(args) not in (6, 7):
                raise Refused(f"{name}: expected 6 or 7 arguments")
            metadata = args[6] if len(args) == 7 else None
        elif len(args) == 4:
            metadata = None
        else:
            raise Refused(f"{name}: expected 4 arguments")
        store, offset, size, stride = args[:4]
        if not (_is_int(offset) and all(isinstance(s, tuple) for s in (size, stride))):
            raise Refused(f"{name}: offset, size and stride must be an int and two tuples")
        if not all(_is_int(x) for x in size + stride) or len(size) != len(stride):
            raise Refused(f"{name}: size {size!r:.60} and stride {stride!r:.60} do not match")
        array = self.tensor(store, offset, size, stride, dtype)
        return _with_metadata(array, metadata)

    def _persistent(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise Refused(f"persistent id {pid!r:.80}: only storages are allowed")
        _, kind, key, _location, numel = pid[:5]
        if not (isinstance(kind, StorageType) and isinstance(key, str) and _is_int(numel)):
            raise Refused(f"persistent id {pid!r:.80}: expected a storage type, key and size")
        if len(pid) == 6 and pid[5] is not None:
            raise Refused(f"storage {key!r} is a view of another (torch < 1.0), not supported")
        if numel < 0:
            raise Refused(f"storage {key!r} has {numel} elements")
        return self.storage(StorageId(kind.dtype, kind.typed, key, numel))

    def _mapping(self, target: Any, name: str) -> Any:
        if type(target) not in (dict, OrderedDict, Counter):
            raise Refused(f"{name} on a {type(target).__name__}, not a dict")
        return target

    def _build(self, target: Any, state: Any) -> None:
        if isinstance(target, _NumpyDtype):
            target._build(state)
        elif type(target) is OrderedDict and isinstance(state, dict):
            if not all(isinstance(k, str) and k.isidentifier() and k[:2] != "__" for k in state):
                raise Unsafe("uses BUILD with attribute names that are not plain names")
            target.__dict__.update(state)
        else:
            raise Unsafe(
                f"uses BUILD on a {type(target).__name__}, where safe loading only sets an "
                "OrderedDict's attributes"
            )

    def _refused_globals(self) -> str:
        """The message for a global outside the table, naming every one the pickle needs."""
        needed = sorted({g for g in self._globals_named() if g not in _GLOBALS})
        return (
            f"needs globals this reader does not allow: {', '.join(needed)}. It runs no code "
            "from a file and reads what torch.load(weights_only=True) reads but sparse, "
            "quantized, meta and complex32 tensors: dense tensors, Parameters, containers, "
            "numbers, strings and bytes"
        )

    def _globals_named(self) -> list[str]:
        """Every ``GLOBAL`` from the pickle's start, scanning opcodes without running them."""
        found, self.pos = [], self.start + 2
        sizes = {"BININT": 4, "BININT1": 1, "BININT2": 2, "BINFLOAT": 8, "BINGET": 1,
                 "LONG_BINGET": 4, "BINPUT": 1, "LONG_BINPUT": 4}  # fmt: skip
        try:
            while self.pos < self.end:
                name = _OPS.get(bytes(self._read(1)))
                if name is None or name == "STOP":
                    break
                if name == "GLOBAL":
                    found.append(global_name(self._line(), self._line()))
                elif name == "BINUNICODE":
                    self._read(struct.unpack("<I", self._read(4))[0])
                elif name in ("LONG1", "SHORT_BINSTRING"):
                    self._read(self._read(1)[0])
                else:
                    self._read(sizes.get(name, 0))
        except (Refused, UnicodeDecodeError):
            pass
        return found


def _with_metadata(array: Any, metadata: Any) -> Any:
    """A tensor's conj and neg bits (``{"conj": True}``) applied: a copy with the values."""
    if not metadata:
        return array
    if not (isinstance(metadata, dict) and set(metadata) <= {"conj", "neg"}):
        raise Refused(f"tensor metadata {metadata!r:.80}: only the conj and neg bits")
    if metadata.get("conj"):
        array = np.conj(array)
    if metadata.get("neg"):
        array = np.negative(array)
    array.flags.writeable = False
    return array


def dump(obj: Any, tensor: Callable[[Any, str], Tensor | None]) -> bytes:
    """A protocol 2 pickle of ``obj`` as ``torch.save`` writes it, tensors as persistent ids.

    Args:
      obj: dicts (``OrderedDict``, ``Counter``), lists, tuples, sets, str, bytes, bytearray,
        int, float, complex, bool, None, and whatever ``tensor`` takes.
      tensor: the tensor for a value at a key path (e.g. ``['net']['fc.weight']``), or None
        for a value that is not one; called once per object, in the order ``torch.save``
        numbers storages.

    Returns:
      The pickle.

    Raises:
      TypeError: naming the key path of the first value it cannot write, and what it can.

    Example:
      >>> load(dump({"epoch": 3, "tags": {"ema"}}, lambda v, p: None), "f.pth", None, None)[0]
      {'epoch': 3, 'tags': {'ema'}}
    """
    writer = _Writer(tensor)
    writer.out.append(b"\x80\x02")
    try:
        writer._save(obj, "")
    except RecursionError:
        raise TypeError(
            "cannot store the checkpoint: it nests too deep, or holds itself through a tuple"
        ) from None
    writer.out.append(b".")
    return b"".join(writer.out)


class _Writer:
    def __init__(self, tensor: Callable[[Any, str], Tensor | None]) -> None:
        self.tensor = tensor
        self.out: list[Any] = []
        self.memo: dict[int, int] = {}
        self.kept: list[Any] = []  # keeps memoized objects alive, so their ids stay theirs

    def _put(self, obj: Any) -> None:
        index = len(self.memo)
        self.memo[id(obj)] = index
        self.kept.append(obj)
        self.out.append(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))

    def _get(self, obj: Any) -> bool:
        index = self.memo.get(id(obj))
        if index is None:
            return False
        self.out.append(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))
        return True

    def _global(self, value: Any) -> None:
        if self._get(value):
            return
        module, _, name = _NAMES[id(value)].rpartition(".")
        if (module, name) in _compat_pickle.REVERSE_NAME_MAPPING:
            module, name = _compat_pickle.REVERSE_NAME_MAPPING[(module, name)]
        self.out.append(f"c{module}\n{name}\n".encode())
        self._put(value)

    def _call(self, func: Any, args: tuple[Any, ...], path: str) -> None:
        self._global(func)
        self._save(args, path)
        self.out.append(b"R")

    def _save(self, obj: Any, path: str) -> None:  # noqa: C901, PLR0912 (one type per branch)
        kind = type(obj)
        if obj is None:
            self.out.append(b"N")
        elif kind is bool:
            self.out.append(b"\x88" if obj else b"\x89")
        elif kind is int:
            self._int(obj, path)
        elif kind is float:
            self.out.append(b"G" + struct.pack(">d", obj))
        elif kind is str:
            raw = obj.encode("utf-8", "surrogatepass")
            self.out += [b"X", struct.pack("<I", len(raw)), raw]
        elif kind is tuple:
            self._tuple(obj, path)
        elif self._get(obj):
            return
        elif kind is list:
            self.out.append(b"]")
            self._put(obj)
            self._items(obj, b"e", path, lambda i, v: [(f"{path}[{i}]", v)])
        elif kind is dict or kind is OrderedDict:
            if kind is OrderedDict:
                self._call(_GLOBALS["collections.OrderedDict"], (), path)
            else:
                self.out.append(b"}")
            self._put(obj)
            self._items(obj.items(), b"u", path, lambda _, kv: self._entry(path, kv))
            attributes = getattr(obj, "__dict__", None)
            if attributes:
                self._save(dict(attributes), f"{path}.__dict__")
                self.out.append(b"b")
        elif kind is set or kind is Counter or kind is complex:
            name = {set: "builtins.set", Counter: "collections.Counter"}.get(kind)  # type: ignore[call-overload]
            args = (obj.real, obj.imag) if kind is complex else (list(obj) if kind is set
                                                                 else dict(obj),)  # fmt: skip
            self._call(_GLOBALS[name or "builtins.complex"], args, path)
            self._put(obj)
        elif kind is bytes or kind is bytearray:
            if kind is bytearray:
                self._global(_GLOBALS["builtins.bytearray"])
            self._call(_encode, (obj.decode("latin1"), "latin1"), path)
            self.out.append(b"\x85R" if kind is bytearray else b"")
            self._put(obj)
        else:
            found = self.tensor(obj, path)
            if found is None:
                raise TypeError(
                    f"cannot store {path or 'the checkpoint'} (a {kind.__name__}): a torch.save "
                    "file read with weights_only=True holds arrays, dicts, lists, tuples, sets, "
                    "str, bytes, int, float, complex, bool and None"
                )
            self._tensor(found, path)
            self._put(obj)

    def _entry(self, path: str, item: tuple[Any, Any]) -> list[tuple[str, Any]]:
        key, value = item
        return [(f"{path}[key {key!r}]", key), (f"{path}[{key!r}]", value)]

    def _items(self, items: Any, op: bytes, path: str, parts: Any) -> None:
        batch: list[tuple[str, Any]] = []
        for i, item in enumerate(items):
            batch += parts(i, item)
            if len(batch) >= 2000:
                self._flush(batch, op)
        if batch:
            self._flush(batch, op)

    def _flush(self, batch: list[tuple[str, Any]], op: bytes) -> None:
        self.out.append(b"(")
        for path, value in batch:
            self._save(value, path)
        self.out.append(op)
        batch.clear()

    def _int(self, value: int, path: str) -> None:
        if 0 <= value < 256:
            self.out.append(b"K" + bytes([value]))
        elif 0 <= value < 65536:
            self.out.append(b"M" + struct.pack("<H", value))
        elif -(2**31) <= value < 2**31:
            self.out.append(b"J" + struct.pack("<i", value))
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) > 255:
                raise TypeError(f"cannot store {path}: an int of {value.bit_length()} bits")
            self.out += [b"\x8a", bytes([len(raw)]), raw]

    def _tuple(self, value: tuple[Any, ...], path: str) -> None:
        if not value:
            self.out.append(b")")
            return
        if len(value) > 3:
            self.out.append(b"(")
        for i, item in enumerate(value):
            self._save(item, f"{path}[{i}]")
        self.out.append(b"t" if len(value) > 3 else bytes([0x84 + len(value)]))

    def _tensor(self, found: Tensor, path: str) -> None:
        dtype = found.storage.dtype
        typed = storage_name(dtype)
        v3 = typed is None
        self._global(_GLOBALS[f"torch._utils._rebuild_tensor_v{3 if v3 else 2}"])
        self.out.append(b"((")  # the arguments, then the persistent id
        self._save("storage", path)
        self._global(_GLOBALS["torch.storage.UntypedStorage" if v3 else f"torch.{typed}"])
        numel = found.storage.size * (dtype.itemsize if v3 else 1)
        fields: tuple[Any, ...] = (found.key, "cpu", numel)
        for field in fields:
            self._save(field, path)
        self.out.append(b"tQ")
        fields = (found.offset, found.shape, found.strides, False)
        for field in fields:
            self._save(field, path)
        self._call(_GLOBALS["collections.OrderedDict"], (), path)
        if v3:
            self._global(_GLOBALS[f"torch.{torch_name(dtype)}"])
        self.out.append(b"tR")
