"""interop: PyTorch (SuperGradients) checkpoints <-> Flax variables.

Needs PyTorch (``pip install 'jema[torch]'``); ``jema`` itself never imports it.
"""

from interop._checkpoint import load_checkpoint, save_checkpoint
from interop._convert import flax_to_torch, torch_to_flax
from interop._inspect import inspect_checkpoint
from interop._report import Converted, Report

__all__ = [
    "Converted",
    "Report",
    "flax_to_torch",
    "inspect_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "torch_to_flax",
]
