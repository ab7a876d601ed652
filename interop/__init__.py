"""interop: PyTorch (SuperGradients) checkpoints <-> Flax variables."""

__all__: list[str] = []
