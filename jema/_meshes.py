"""Shardings on an abstract mesh (as ``jax.eval_shape`` gives them) made concrete: the one rule
jema's restore and interop's loads share."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding


def concrete_sharding(sharding: Any, label: str, action: str) -> Any:
    """``sharding`` on the concrete mesh ``jax.set_mesh`` holds when it names an abstract mesh.

    Args:
      sharding: a template leaf's sharding, or None.
      label: the leaf's path, for the message.
      action: what the caller does with the template, e.g. "restore" or "load".

    Returns:
      ``sharding`` itself, or a ``NamedSharding`` of its spec and memory kind on the current
      concrete mesh.

    Raises:
      ValueError: naming the leaf when no concrete mesh set with ``jax.set_mesh`` stands for
        the abstract one.

    Example:
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> abstract = NamedSharding(mesh.abstract_mesh, jax.P("x"))
      >>> with jax.set_mesh(mesh):
      ...     concrete_sharding(abstract, "params/w", "restore").mesh == mesh
      True
    """
    if not (
        isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, jax.sharding.AbstractMesh)
    ):
        return sharding
    mesh = jax.sharding.get_mesh()
    if not isinstance(mesh, jax.sharding.Mesh) or mesh.abstract_mesh != sharding.mesh:
        raise ValueError(
            f"{label}: the template's sharding {sharding} is on an abstract mesh (as "
            f"jax.eval_shape gives it), which names no devices; {action} inside "
            "`with jax.set_mesh(mesh):` with the concrete mesh it stands for, or give the leaf "
            "NamedSharding(mesh, spec)"
        )
    return NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)
