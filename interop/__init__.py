"""interop: PyTorch (SuperGradients) checkpoints <-> Flax variables.

``torch.save`` files (``.pth``) and safetensors files read, write, load, save and inspect with
numpy alone (``read_checkpoint`` and ``write_checkpoint`` are the ``.pth`` reader and writer, safe
by construction). PyTorch (``pip install "jema[torch]"``) is needed only where a torch object is
the point: an ``nn.Module`` as a template and the tensors ``flax_to_torch`` returns. It is
imported only then: ``import interop`` never imports it, and reading a file never does.

``interop.__jema__`` is True: PyPI's unrelated ``interop`` package (Illumina's) installs the
same top-level name, and ``jema --version`` tells the two apart by it.
"""

from interop._checkpoint import load_checkpoint, save_checkpoint
from interop._convert import flax_to_torch, torch_to_flax
from interop._inspect import inspect_checkpoint
from interop._pth import write_checkpoint
from interop._report import Converted, Report
from interop._schema import read_checkpoint
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
    "read_checkpoint",
    "save_checkpoint",
    "torch_to_flax",
    "write_checkpoint",
]


def __dir__() -> list[str]:
    """The public API only (PEP 562): ``__all__`` and the module's dunders, no private module."""
    dunders = [name for name in globals() if name.startswith("__") and name.endswith("__")]
    return sorted({*__all__, *dunders})
