"""The one dtype table: numpy dtypes (the hub), their PyTorch twins and safetensors codes.

Bits move exactly both ways. PyTorch's twins are looked up by name when PyTorch is there, so
the table, and every safetensors path, works without it. Dtypes numpy holds through
``ml_dtypes`` (bfloat16, float8) cross to PyTorch as a same-width integer, viewed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import ml_dtypes
import numpy as np

from interop._torch import is_tensor, require

if TYPE_CHECKING:
    import torch

# numpy dtype, PyTorch's twin (a ``torch`` attribute), the safetensors code (None: the format
# has none), whether the bits cross to PyTorch as a same-width integer, and the storage class a
# ``torch.save`` pickle names for it (None: torch writes ``UntypedStorage`` and the dtype).
_TABLE: tuple[tuple[np.dtype, str, str | None, bool, str | None], ...] = (
    (np.dtype(np.bool_), "bool", "BOOL", False, "BoolStorage"),
    (np.dtype(np.int8), "int8", "I8", False, "CharStorage"),
    (np.dtype(np.int16), "int16", "I16", False, "ShortStorage"),
    (np.dtype(np.int32), "int32", "I32", False, "IntStorage"),
    (np.dtype(np.int64), "int64", "I64", False, "LongStorage"),
    (np.dtype(np.uint8), "uint8", "U8", False, "ByteStorage"),
    (np.dtype(np.uint16), "uint16", "U16", False, None),
    (np.dtype(np.uint32), "uint32", "U32", False, None),
    (np.dtype(np.uint64), "uint64", "U64", False, None),
    (np.dtype(np.float16), "float16", "F16", False, "HalfStorage"),
    (np.dtype(ml_dtypes.bfloat16), "bfloat16", "BF16", True, "BFloat16Storage"),
    (np.dtype(np.float32), "float32", "F32", False, "FloatStorage"),
    (np.dtype(np.float64), "float64", "F64", False, "DoubleStorage"),
    (np.dtype(ml_dtypes.float8_e4m3fn), "float8_e4m3fn", "F8_E4M3", True, None),
    (np.dtype(ml_dtypes.float8_e5m2), "float8_e5m2", "F8_E5M2", True, None),
    (np.dtype(ml_dtypes.float8_e4m3fnuz), "float8_e4m3fnuz", "F8_E4M3FNUZ", True, None),
    (np.dtype(ml_dtypes.float8_e5m2fnuz), "float8_e5m2fnuz", "F8_E5M2FNUZ", True, None),
    (np.dtype(ml_dtypes.float8_e8m0fnu), "float8_e8m0fnu", "F8_E8M0", True, None),
    (np.dtype(np.complex64), "complex64", "C64", False, "ComplexFloatStorage"),
    (np.dtype(np.complex128), "complex128", None, False, "ComplexDoubleStorage"),
)
_BY_NUMPY = {n: (name, viewed) for n, name, _, viewed, _ in _TABLE}
_BY_NAME = {name: n for n, name, _, _, _ in _TABLE}
_BY_CODE = {code: n for n, _, code, _, _ in _TABLE if code is not None}
_CODES = {n: code for n, _, code, _, _ in _TABLE}
_BY_STORAGE = {storage: n for n, _, _, _, storage in _TABLE if storage is not None}
_STORAGES = {n: storage for n, _, _, _, storage in _TABLE}


def is_array(value: Any) -> bool:
    """Whether a state_dict value holds numbers: a numpy or jax array, or a tensor.

    Args:
      value: anything.

    Returns:
      True for an array or tensor.

    Example:
      >>> is_array(np.zeros(2)), is_array([0.0, 0.0])
      (True, False)
    """
    return isinstance(value, np.ndarray | jax.Array) or is_tensor(value)


def as_numpy(value: Any) -> np.ndarray:
    """A numpy array with the bits of a tensor or array, sharing its memory where it can.

    Args:
      value: a dense tensor with data (detached and moved to the CPU first), or a numpy or
        jax array, of a dtype in the table.

    Returns:
      A numpy array; bfloat16 and float8 tensors become ``ml_dtypes`` arrays. A CPU tensor's
      array shares its memory: copy it before writing to it.

    Raises:
      TypeError: for a sparse or meta tensor (no dense data), or a dtype outside the table
        (quantized ones included), listing the allowed ones.

    Example:
      >>> as_numpy(np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16))
      array([1.5, -2], dtype=bfloat16)
    """
    if not is_tensor(value):
        array = np.asarray(value)
        numpy_dtype(array.dtype)
        return array
    if str(value.layout) != "torch.strided" or value.is_meta:
        kind = "meta" if value.is_meta else str(value.layout).removeprefix("torch.")
        raise TypeError(f"a {kind} tensor has no dense data; allowed: dense tensors with data")
    dtype = numpy_dtype(value.dtype)
    tensor = value.detach().cpu().resolve_conj().resolve_neg()
    if not _BY_NUMPY[dtype][1]:
        return tensor.numpy()
    return tensor.view(_torch_dtype(_carrier(dtype))).numpy().view(dtype)


def to_torch(array: Any) -> torch.Tensor:
    """A contiguous CPU tensor of its own with the bits of a numpy or jax array.

    Args:
      array: a numpy or jax array of a dtype in the table.

    Returns:
      A CPU tensor.

    Raises:
      TypeError: for a dtype outside the table, listing the allowed ones.
      ImportError: when PyTorch is not installed.

    Example:
      >>> to_torch(np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16))
      tensor([ 1.5000, -2.0000], dtype=torch.bfloat16)
    """
    torch = require("making torch tensors")
    source = np.asarray(array)
    dtype = _torch_dtype(source.dtype)
    bits = np.asarray(source, order="C")
    if _BY_NUMPY[bits.dtype][1]:
        bits = bits.view(_carrier(bits.dtype))
    tensor = torch.from_dlpack(bits).view(dtype)
    return tensor.clone() if np.may_share_memory(bits, source) else tensor


def _carrier(dtype: np.dtype) -> np.dtype:
    """The integer dtype of the same width that moves an ``ml_dtypes`` dtype's bits."""
    return np.dtype(np.uint8 if dtype.itemsize == 1 else np.int16)


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype that holds a PyTorch or numpy dtype's values exactly, checked to be in
    the table.

    Args:
      dtype: a PyTorch dtype, or anything ``np.dtype`` takes.

    Returns:
      The numpy dtype.

    Raises:
      TypeError: for a dtype outside the table, listing the allowed ones.

    Example:
      >>> numpy_dtype("float32"), numpy_dtype(np.dtype(ml_dtypes.bfloat16))
      (dtype('float32'), dtype(bfloat16))
    """
    if str(dtype).startswith("torch."):
        name = str(dtype).removeprefix("torch.")
        if name not in _BY_NAME:
            raise TypeError(f"unsupported tensor dtype {dtype}; allowed: {_allowed()}")
        return _BY_NAME[name]
    dtype = np.dtype(dtype)
    if dtype not in _BY_NUMPY:
        raise TypeError(f"unsupported array dtype {dtype}; allowed: {_allowed()}")
    return dtype


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    """PyTorch's twin of a numpy dtype in the table."""
    return getattr(require("making torch tensors"), _BY_NUMPY[numpy_dtype(dtype)][0])


def safetensors_code(dtype: np.dtype) -> str | None:
    """How a safetensors header names a dtype.

    Args:
      dtype: a numpy dtype in the table.

    Returns:
      Its code, e.g. ``"BF16"``, or None when the format has none (complex128).

    Raises:
      TypeError: for a dtype outside the table, listing the allowed ones.

    Example:
      >>> safetensors_code(np.dtype(ml_dtypes.bfloat16)), safetensors_code(np.dtype("complex128"))
      ('BF16', None)
    """
    return _CODES[numpy_dtype(dtype)]


def from_safetensors_code(code: str) -> np.dtype:
    """The numpy dtype of a safetensors header's dtype code.

    Args:
      code: e.g. ``"F32"`` or ``"F8_E4M3"``.

    Returns:
      The numpy dtype.

    Raises:
      TypeError: for a code outside the table (e.g. ``"F4"``), listing the allowed ones.

    Example:
      >>> from_safetensors_code("F8_E4M3")
      dtype(float8_e4m3fn)
    """
    if code not in _BY_CODE:
        raise TypeError(f"unsupported safetensors dtype {code}; allowed: {', '.join(_BY_CODE)}")
    return _BY_CODE[code]


def torch_name(dtype: np.dtype) -> str:
    """PyTorch's name of a numpy dtype in the table (a ``torch`` attribute, no PyTorch needed).

    Args:
      dtype: a numpy dtype in the table.

    Returns:
      The name, e.g. ``"float8_e4m3fn"``; ``numpy_dtype("torch." + name)`` goes back.

    Raises:
      TypeError: for a dtype outside the table, listing the allowed ones.

    Example:
      >>> torch_name(np.dtype(ml_dtypes.float8_e4m3fn))
      'float8_e4m3fn'
    """
    return _BY_NUMPY[numpy_dtype(dtype)][0]


def storage_name(dtype: np.dtype) -> str | None:
    """The typed storage class a ``torch.save`` pickle names for a dtype.

    Args:
      dtype: a numpy dtype in the table.

    Returns:
      e.g. ``"FloatStorage"``; None for the dtypes torch writes as ``UntypedStorage`` with the
      dtype given apart (uint16/32/64, float8).

    Raises:
      TypeError: for a dtype outside the table, listing the allowed ones.

    Example:
      >>> storage_name(np.dtype("int64")), storage_name(np.dtype("uint16"))
      ('LongStorage', None)
    """
    return _STORAGES[numpy_dtype(dtype)]


def from_storage_name(name: str) -> np.dtype | None:
    """The numpy dtype of a typed storage class named in a ``torch.save`` pickle.

    Args:
      name: e.g. ``"HalfStorage"``.

    Returns:
      The numpy dtype, or None for a name outside the table (``ComplexHalfStorage``, the
      quantized ones, ``UntypedStorage``).

    Example:
      >>> from_storage_name("BFloat16Storage"), from_storage_name("QInt8Storage")
      (dtype(bfloat16), None)
    """
    return _BY_STORAGE.get(name)


def all_dtypes() -> tuple[np.dtype, ...]:
    """Every numpy dtype in the table, in its order.

    Returns:
      The dtypes; ``torch_name`` and ``storage_name`` give their names in a ``torch.save``
      pickle.

    Example:
      >>> [torch_name(d) for d in all_dtypes()][:3]
      ['bool', 'int8', 'int16']
    """
    return tuple(n for n, _, _, _, _ in _TABLE)


def _allowed() -> str:
    return ", ".join(name for _, name, _, _, _ in _TABLE)
