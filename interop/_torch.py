"""PyTorch, imported on first use: interop reads and writes ``.pth`` and safetensors files
without it; only ``nn.Module`` templates and ``flax_to_torch``'s tensors need it."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

INSTALL = 'pip install "jema[torch]"'


def require(operation: str) -> ModuleType:
    """PyTorch, imported now, for an operation that cannot do without it.

    Args:
      operation: what needs it, e.g. ``"reading ckpt.pth (a torch.save file)"``.

    Returns:
      The ``torch`` module.

    Raises:
      ImportError: naming ``operation`` and how to install PyTorch, when it is not installed.

    Example:
      >>> require("flax_to_torch").__name__
      'torch'
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{operation} needs PyTorch, which is not installed: {INSTALL}. .pth and "
            "safetensors files load, save and inspect without it; PyTorch is needed only for "
            "nn.Module templates and flax_to_torch's tensors."
        ) from e
    return torch


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.Tensor``, without importing PyTorch.

    A tensor exists only once PyTorch is imported, so nothing is a tensor before.

    Args:
      value: anything.

    Returns:
      True for a tensor (a ``Parameter`` included).

    Example:
      >>> import numpy as np
      >>> is_tensor(np.zeros(2))
      False
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def is_module(value: Any) -> bool:
    """Whether ``value`` is a ``torch.nn.Module``, without importing PyTorch.

    Args:
      value: anything.

    Returns:
      True for a module.

    Example:
      >>> is_module({"fc.weight": None})
      False
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)
