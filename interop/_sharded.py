"""Converted arrays as jax arrays: whole on the default device, or shard by shard where the
template leaf carries a sharding.

A sharded leaf is built from its source in Flax's layout, a strided view of the state_dict's
array (for a file, of its memory map): each addressable shard copies only the block it needs,
in chunks of ``CHUNK`` source bytes along the block's outermost axis in memory, and a chunk's
pages of a read-only memory map are let go (``madvise(MADV_DONTNEED)``) once copied, so the
process's resident memory grows by its shards, not by the file. Devices that hold the same
block (a replicated leaf, or an axis the spec leaves out) share one copy per process.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding, make_single_device_sharding

from jema._meshes import concrete_sharding

CHUNK = 16 << 20  # source bytes copied before their pages are let go


def to_jax(array: np.ndarray, dtype: np.dtype, like: Any, label: str) -> Any:
    """A converted array as the template leaf ``like`` asks for it.

    Args:
      array: the leaf's values in Flax's layout, any strides (a view of the source).
      dtype: the template's dtype (``array`` is cast to it).
      like: the template leaf: an array, a ``jax.ShapeDtypeStruct`` or an nnx abstract value.
      label: the leaf's path, for errors.

    Returns:
      A ``jax.Array`` with ``like``'s sharding when it spans several devices; else a jax array
      on the default device, or a numpy copy for a dtype JAX cannot hold (float64 with x64
      off).

    Raises:
      ValueError: naming the leaf when its sharding cannot hold it: a shape it does not divide,
        an abstract mesh with no such concrete mesh set, or a dtype JAX cannot hold.

    Example:
      >>> to_jax(np.ones((2, 3), np.float32).T, np.dtype(np.float32), np.zeros((3, 2)), "k").shape
      (3, 2)
    """
    sharding = sharding_of(like, label)
    if sharding is None:
        whole = array.astype(dtype, copy=False)
        if jax.dtypes.canonicalize_dtype(dtype) == dtype:
            return jnp.asarray(whole)
        return np.array(whole, order="C", copy=True)
    return place(array, dtype, sharding, label)


def sharding_of(like: Any, label: str) -> Sharding | None:
    """The sharding a template leaf asks for, or None where it is loaded whole, as an
    uncommitted array on the default device (no sharding, or one on the default device and its
    default memory: a template from ``init`` or ``jax.eval_shape``).

    Args:
      like: a template leaf.
      label: its path, for errors.

    Returns:
      Its sharding on a concrete mesh, or None.

    Raises:
      ValueError: naming the leaf for a sharding on an abstract mesh that no concrete mesh set
        with ``jax.set_mesh`` matches.

    Example:
      >>> sharding_of(jax.ShapeDtypeStruct((2,), np.float32), "params/fc/bias") is None
      True
    """
    sharding = getattr(like, "sharding", None)
    if not isinstance(sharding, Sharding):
        return None
    sharding = concrete_sharding(sharding, label, "load")
    if len(sharding.device_set) > 1:
        return sharding
    (device,) = sharding.device_set
    default = jax.devices()[0]
    elsewhere = device != default or sharding.memory_kind not in (
        None,
        default.default_memory().kind,
    )
    return sharding if elsewhere else None


def place(array: np.ndarray, dtype: np.dtype, sharding: Sharding, label: str) -> jax.Array:
    """``array`` cast to ``dtype`` as a ``jax.Array`` with ``sharding``, built shard by shard.

    Args:
      array: the leaf's values in Flax's layout, any strides (a view of the source).
      dtype: the dtype to cast each block to.
      sharding: the leaf's sharding.
      label: the leaf's path, for errors.

    Returns:
      The global array; this process fills its addressable shards, reading each distinct block
      of ``array`` once.

    Raises:
      ValueError: naming the leaf when ``sharding`` does not divide its shape, or ``dtype`` is
        one JAX cannot hold (float64 with x64 off).

    Example:
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> sharding = jax.sharding.NamedSharding(mesh, jax.P("x"))
      >>> out = place(np.arange(4.0, dtype=np.float32), np.dtype(np.float32), sharding, "b")
      >>> out.sharding == sharding, out.tolist()
      (True, [0.0, 1.0, 2.0, 3.0])
    """
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(
            f"{label}: {dtype} in the template, which JAX holds only with x64 enabled, so it "
            f"cannot be given the template's sharding {sharding}; enable "
            "jax.config.update('jax_enable_x64', True), or use a 32-bit dtype in the template "
            "and pass cast=True"
        )
    try:
        indices = sharding.addressable_devices_indices_map(array.shape)
    except ValueError as e:
        raise ValueError(
            f"{label} {array.shape}: the template's sharding cannot hold it: {e}; pass a "
            "PartitionSpec whose mesh axes divide the dimensions they split"
        ) from e
    devices: dict[tuple[tuple[int, int, int], ...], list[Any]] = {}
    blocks: dict[tuple[tuple[int, int, int], ...], tuple[slice, ...]] = {}
    for device, index in indices.items():
        key = tuple(s.indices(n) for s, n in zip(index or (), array.shape, strict=True))
        devices.setdefault(key, []).append(device)
        blocks[key] = tuple(slice(*k) for k in key)
    release = _releaser(array)
    shards = []
    for key, group in devices.items():
        block = copy_block(array[blocks[key]], dtype, release)
        kinds = [make_single_device_sharding(d, memory_kind=sharding.memory_kind) for d in group]
        shards += jax.device_put([block] * len(group), kinds)
        del block
    return jax.make_array_from_single_device_arrays(array.shape, sharding, shards, dtype=dtype)


def copy_block(
    view: np.ndarray, dtype: np.dtype, release: Callable[[np.ndarray], None]
) -> np.ndarray:
    """A new C-contiguous ``dtype`` copy of ``view``, made ``CHUNK`` source bytes at a time along
    its axis of largest stride (the outermost in the source's memory), each chunk's source
    handed to ``release`` once copied.

    Args:
      view: a block of the source, any strides.
      dtype: the copy's dtype (cast as ``astype`` casts).
      release: called with each copied chunk of ``view``.

    Returns:
      The copy.

    Example:
      >>> copy_block(np.arange(6).reshape(2, 3).T, np.dtype(np.float32), lambda part: None)
      array([[0., 3.],
             [1., 4.],
             [2., 5.]], dtype=float32)
    """
    out = np.empty(view.shape, dtype)
    if view.ndim == 0 or view.size == 0:
        np.copyto(out, view, casting="unsafe")
        return out
    axis = int(np.argmax(np.abs(view.strides)))
    step = max(1, CHUNK // max(1, abs(view.strides[axis])))
    for start in range(0, view.shape[axis], step):
        part = (slice(None),) * axis + (slice(start, start + step),)
        np.copyto(out[part], view[part], casting="unsafe")
        release(view[part])
    return out


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The memory map ``array`` is a view of, found through its bases, or None."""
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def _releaser(array: np.ndarray) -> Callable[[np.ndarray], None]:
    """What lets go of the pages of ``array``'s read-only memory map that a part of it spans:
    they stay in the page cache, out of the process's resident memory, and are read again from
    the file if touched. Writable maps (a copy-on-write one would lose its changes) and arrays
    in memory are left alone."""
    mapped = _mapping(array)
    if mapped is None or not hasattr(mapped, "madvise"):
        return lambda part: None
    with memoryview(mapped) as view:
        if not view.readonly:
            return lambda part: None
    begin = np.frombuffer(mapped, np.uint8).__array_interface__["data"][0]
    size = len(mapped)

    def release(part: np.ndarray) -> None:
        low, high = np.lib.array_utils.byte_bounds(part)
        start = (low - begin) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(high - begin, size)
        if 0 <= start < end:
            mapped.madvise(mmap.MADV_DONTNEED, start, end - start)

    return release
