"""What ``jema --version`` reports: jema's version, its stack's, and where ``interop`` comes from.

Versions are read from the installed metadata, so nothing heavy (torch) is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "safetensors", "torch")


def version_report() -> str:
    """One line per package: jema, the stack it runs on, and ``interop``.

    Returns:
      The report, e.g. ``jema 0.1.0`` then ``jax 0.10.2`` ... ``torch not installed`` (an
      optional one absent) then ``interop: jema's (...)``.

    Example:
      >>> version_report().splitlines()[0].startswith("jema ")
      True
    """
    lines = [f"jema {_version('jema') or 'unknown (not installed)'}"]
    lines += [f"{name} {_version(name) or 'not installed'}" for name in STACK]
    problem = foreign_interop()
    lines.append(f"interop: {problem}" if problem else f"interop: jema's ({_interop_origin()})")
    return "\n".join(lines)


def foreign_interop() -> str | None:
    """Why ``import interop`` does not give jema's bridge, or None when it does.

    PyPI's unrelated ``interop`` package (Illumina's, GPL) installs the same top-level name;
    installing both overwrites each other's files. jema's marks itself with ``__jema__``.

    Returns:
      A one-line explanation, or None.

    Example:
      >>> foreign_interop() is None
      True
    """
    if importlib.util.find_spec("interop") is None:
        return "not importable: reinstall jema (pip install --force-reinstall jema)"
    try:
        module = importlib.import_module("interop")
    except ImportError as e:
        return f"{_interop_origin()} fails to import ({e}); reinstall jema"
    if getattr(module, "__jema__", False) is not True:
        return (
            f"{_interop_origin()} is not jema's interop (PyPI's unrelated 'interop' package "
            "installs the same name): pip uninstall interop, then pip install --force-reinstall "
            "jema"
        )
    return None


def _interop_origin() -> str:
    spec = importlib.util.find_spec("interop")
    return str(spec.origin) if spec is not None else "nowhere"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
