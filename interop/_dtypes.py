"""One dtype table for PyTorch tensors <-> numpy arrays, bit-exact both ways."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

# torch dtype, numpy dtype, and the same-width integer pair used to move the bits when
# torch's `.numpy()` cannot (bfloat16 has no numpy twin inside torch).
_TABLE: tuple[tuple[torch.dtype, np.dtype, tuple[torch.dtype, np.dtype] | None], ...] = (
    (torch.float32, np.dtype(np.float32), None),
    (torch.float16, np.dtype(np.float16), None),
    (torch.float64, np.dtype(np.float64), None),
    (torch.bfloat16, np.dtype(ml_dtypes.bfloat16), (torch.int16, np.dtype(np.int16))),
    (torch.int64, np.dtype(np.int64), None),
    (torch.int32, np.dtype(np.int32), None),
    (torch.int16, np.dtype(np.int16), None),
    (torch.int8, np.dtype(np.int8), None),
    (torch.uint8, np.dtype(np.uint8), None),
    (torch.bool, np.dtype(np.bool_), None),
)
_BY_TORCH = {t: (n, via) for t, n, via in _TABLE}
_BY_NUMPY = {n: (t, via) for t, n, via in _TABLE}


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Copies a tensor into a new numpy array with the same dtype and bits.

    Args:
      tensor: a dense tensor with data (detached and moved to the CPU first) of a dtype in the
        table.

    Returns:
      A new array; bfloat16 becomes ``ml_dtypes.bfloat16``.

    Raises:
      TypeError: for a sparse or meta tensor (no dense data), or a dtype outside the table
        (quantized ones included), listing the allowed ones.

    Example:
      >>> to_numpy(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
      array([1.5, -2], dtype=bfloat16)
    """
    if tensor.layout != torch.strided or tensor.is_meta:
        kind = "meta" if tensor.is_meta else str(tensor.layout).removeprefix("torch.")
        raise TypeError(f"a {kind} tensor has no dense data; allowed: dense tensors with data")
    if tensor.dtype not in _BY_TORCH:
        raise TypeError(f"unsupported tensor dtype {tensor.dtype}; allowed: {_allowed()}")
    dtype, via = _BY_TORCH[tensor.dtype]
    tensor = tensor.detach().cpu()
    if via is None:
        return np.array(tensor.numpy(), copy=True)
    return np.array(tensor.view(via[0]).numpy(), copy=True).view(dtype)


def to_torch(array: np.ndarray) -> torch.Tensor:
    """Copies an array (numpy or jax) into a new contiguous tensor with the same dtype and bits.

    Args:
      array: a numpy or jax array of a dtype in the table.

    Returns:
      A new CPU tensor that shares no memory with ``array``.

    Raises:
      TypeError: for a dtype outside the table, listing the allowed ones.

    Example:
      >>> to_torch(np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16))
      tensor([ 1.5000, -2.0000], dtype=torch.bfloat16)
    """
    array = np.asarray(array)
    if array.dtype not in _BY_NUMPY:
        raise TypeError(f"unsupported array dtype {array.dtype}; allowed: {_allowed()}")
    dtype, via = _BY_NUMPY[array.dtype]
    array = np.array(array, order="C", copy=True)
    if via is None:
        return torch.from_numpy(array)
    return torch.from_numpy(array.view(via[1])).view(dtype)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that holds a torch dtype's values exactly.

    Args:
      dtype: a torch dtype in the table.

    Returns:
      Its numpy twin.

    Raises:
      TypeError: for a dtype outside the table, listing the allowed ones.

    Example:
      >>> numpy_dtype(torch.bfloat16)
      dtype(bfloat16)
    """
    if dtype not in _BY_TORCH:
        raise TypeError(f"unsupported tensor dtype {dtype}; allowed: {_allowed()}")
    return _BY_TORCH[dtype][0]


def _allowed() -> str:
    return ", ".join(str(t).removeprefix("torch.") for t, _, _ in _TABLE)
