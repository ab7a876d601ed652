"""interop: PyTorch (SuperGradients) checkpoints <-> Flax variables.

Safetensors files load, save and inspect with numpy alone; ``torch.save`` files (``.pth``),
``nn.Module`` templates and ``flax_to_torch`` need PyTorch (``pip install "jema[torch]"``),
imported only when one of them is used: ``import interop`` never imports it.

``interop.__jema__`` is True: PyPI's unrelated ``interop`` package (Illumina's) installs the
same top-level name, and ``jema --version`` tells the two apart by it.
"""

from interop._checkpoint import load_checkpoint, save_checkpoint
from interop._convert import flax_to_torch, torch_to_flax
from interop._inspect import inspect_checkpoint
from interop._report import Converted, Report
from interop._types import StateDict, TorchTemplate, Variables

__jema__ = True

__all__ = [
    "Converted",
    "Report",
    "StateDict",
    "TorchTemplate",
    "Variables",
    "flax_to_torch",
    "inspect_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "torch_to_flax",
]
