"""The named types of interop's signatures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from flax import nnx

if TYPE_CHECKING:
    import torch

StateDict: TypeAlias = Mapping[str, Any]
"""PyTorch names -> tensors, or numpy arrays (a state_dict read without PyTorch)."""

Variables: TypeAlias = Mapping[str, Any] | nnx.Module
"""Linen variables (``{"params": ..., "batch_stats": ...}``), an nnx Module or State, or a
mapping of names to those (``{"student": ..., "teacher": ...}``)."""

TorchTemplate: TypeAlias = "torch.nn.Module | StateDict"
"""A PyTorch module, or its state_dict (tensors, or numpy arrays read from a file)."""
