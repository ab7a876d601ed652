"""Donated buffers stay in their own memory: a lowering-time repair of jax's donation pairing.

On one device, ``jax.jit`` without ``out_shardings`` pairs each donated input with the first
output of the same shape and dtype, whatever the memory kinds of the two
(``jax._src.interpreters.mlir._set_up_aliases`` ignores them unless every output's kind is given
by ``out_shardings``). A donated EMA in host memory then backs a device output, or a donated
device buffer backs the host EMA, and XLA aborts the process ("PjRtBuffer's memory kind does
not match sharding's memory kind"). Every array jema moves between memories under a trace goes
through :func:`keep_donations_in_their_memory`; when the program is lowered, its rule turns each
such cross-memory pairing of the entry function into an XLA buffer donation, so that XLA, which
knows every buffer's memory, chooses the aliases itself, as jax already has it do on several
devices.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

ALIAS = "tf.aliasing_output"  # an entry argument's attribute: the output it is written into
DONOR = "jax.buffer_donor"  # an entry argument's attribute: XLA may reuse it for any output
MEMORY_KIND = "mhlo.memory_kind"  # an argument's or result's memory; absent means "device"

_guard = Primitive("jema_keep_donations_in_their_memory")
_guard.multiple_results = True
_guard.def_impl(lambda *arrays: list(arrays))
_guard.def_abstract_eval(lambda *avals: list(avals))


def keep_donations_in_their_memory(tree: Any) -> Any:
    """``tree`` unchanged, marking the traced program so no donation pairs two memory kinds.

    Args:
      tree: a pytree of arrays just moved to another memory kind (None leaves stay None).

    Returns:
      The same values; traced leaves pass through an identity that costs nothing at run time.

    Example:
      >>> import jax.numpy as jnp
      >>> keep_donations_in_their_memory({"w": jnp.ones(2)})["w"].tolist()
      [1.0, 1.0]
    """
    leaves, treedef = jax.tree.flatten(tree)
    traced = [n for n, leaf in enumerate(leaves) if isinstance(leaf, jax.core.Tracer)]
    if not traced:
        return tree
    for n, leaf in zip(traced, _guard.bind(*(leaves[n] for n in traced)), strict=True):
        leaves[n] = leaf
    return jax.tree.unflatten(treedef, leaves)


def _repair_cross_memory_aliases(module: Any) -> None:
    """Turn each alias of ``module``'s entry function between two memory kinds into a donation."""
    main = next((op for op in module.body.operations if _symbol(op) == "main"), None)
    if main is None or "arg_attrs" not in main.attributes or "res_attrs" not in main.attributes:
        return
    result_kinds = [_kind(_entries(attrs)) for attrs in main.attributes["res_attrs"]]
    args, repaired = [], False
    for attrs in main.attributes["arg_attrs"]:
        entries = _entries(attrs)
        alias = entries.get(ALIAS)
        if alias is not None and _kind(entries) != result_kinds[mlir.ir.IntegerAttr(alias).value]:
            del entries[ALIAS]
            entries[DONOR] = mlir.ir.BoolAttr.get(True)
            repaired = True
        args.append(mlir.ir.DictAttr.get(entries))
    if repaired:
        main.attributes["arg_attrs"] = mlir.ir.ArrayAttr.get(args)


def _symbol(op: Any) -> str | None:
    if "sym_name" not in op.attributes:
        return None
    return mlir.ir.StringAttr(op.attributes["sym_name"]).value


def _entries(attrs: Any) -> dict[str, Any]:
    entries = mlir.ir.DictAttr(attrs)
    return {entries[n].name: entries[n].attr for n in range(len(entries))}


def _kind(entries: dict[str, Any]) -> str:
    kind = entries.get(MEMORY_KIND)
    return "device" if kind is None else mlir.ir.StringAttr(kind).value


def _lower(ctx: Any, *operands: Any) -> list[Any]:
    _repair_cross_memory_aliases(ctx.module_context.module)
    return list(operands)


mlir.register_lowering(_guard, _lower)
batching.primitive_batchers[_guard] = lambda arrays, dims: (_guard.bind(*arrays), dims)
ad.primitive_jvps[_guard] = lambda primals, tangents: (_guard.bind(*primals), list(tangents))
