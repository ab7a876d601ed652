"""Loading Flax variables from SuperGradients-style checkpoints and Hugging Face folders, and
saving them back."""

from __future__ import annotations

import itertools
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Literal, Unpack, overload

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from interop._convert import Options, state_dict, torch_to_flax
from interop._files import is_safetensors, save_safetensors, write_folder_atomic
from interop._hf import (
    check_replaceable,
    is_folder,
    is_folder_target,
    shard_size,
    untied,
    write_folder,
)
from interop._layouts import FeatureMaps
from interop._names import Rename
from interop._pth import write_pth
from interop._report import Converted, Report
from interop._schema import flat_section_hint, pick_section, read_checkpoint, to_safetensors
from interop._tree import flatten
from interop._types import TorchTemplate, Variables

_SPILL = 1 << 20  # bytes: a gathered leaf at least this large waits in a file, not in memory


@overload
def load_checkpoint(
    path: str | os.PathLike[str], template: Variables, *, which: str = ...,
    prefix: str | None = ...,
    strict: Literal[True] = ..., **options: Unpack[Options],
) -> Any: ...  # fmt: skip
@overload
def load_checkpoint(
    path: str | os.PathLike[str], template: Variables, *, which: str = ...,
    prefix: str | None = ...,
    strict: Literal[False], **options: Unpack[Options],
) -> Converted: ...  # fmt: skip
@overload
def load_checkpoint(
    path: str | os.PathLike[str], template: Variables, *, which: str = ...,
    prefix: str | None = ...,
    strict: bool, **options: Unpack[Options],
) -> Any: ...  # fmt: skip


def load_checkpoint(
    path: str | os.PathLike[str],
    template: Variables,
    *,
    which: str = "auto",
    prefix: str | None = None,
    strict: bool = True,
    rename: Rename | None = None,
    match_by_order: bool = False,
    cast: bool = False,
    flattened: FeatureMaps | None = None,
) -> Any:
    """Loads ``net`` or ``ema_net`` from a ``.pth``/``.safetensors`` file or a Hugging Face
    folder into a Flax template.

    Args:
      path: a ``torch.save`` checkpoint (SuperGradients layout or a bare state_dict), a
        safetensors file, or a Hugging Face folder (``model.safetensors``, or shards and
        ``model.safetensors.index.json``; the ``pytorch_model.bin`` kinds alike) or its
        ``*.index.json``, read by ``read_checkpoint`` (no PyTorch needed, memory-mapped).
      template: linen variables, an nnx model or state (see ``torch_to_flax``).
      which: ``"auto"`` (``ema_net`` when present, else ``net``), ``"net"`` or ``"ema_net"``.
      prefix: load one part of a composite checkpoint, e.g. ``"teacher."`` of a KD model, or
        ``"net."`` for a flat safetensors file from elsewhere holding only ``net.<key>`` keys
        (without the ``jema.sections`` marker ``save_checkpoint`` writes, such a file reads as a
        bare state_dict, as a model whose only child is ``self.net`` would save it).
      strict, rename, match_by_order, cast, flattened: as in ``torch_to_flax``, which also
        gives the default names (``nnx.Sequential`` and ``nn.Sequential`` children both
        ``<name>.0``); ``flattened={"fc": (C, H, W)}`` for a Linear after ``nn.Flatten`` of a
        conv map whose Flax twin flattens NHWC.

    Returns:
      The filled template (linen dicts or ``nnx.State``), or ``Converted(value, report)`` when
      ``strict=False``.

    Raises:
      FileNotFoundError: naming the file when there is none, and what is expected there.
      OSError: naming the file when it cannot be opened.
      ValueError: naming the file, for unreadable or unsafe files, a missing section, or
        mismatches (strict); for bad options, as ``torch_to_flax``; naming the folder and the
        file for a folder without weights, a malformed index, a missing shard or a key its
        shard lacks; for ``match_by_order`` with a safetensors file or a folder (their keys are
        sorted, not in the module's order).

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> tmpl = {"params": {"fc": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}}
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
      >>> save_checkpoint(path, net=tmpl, ema_net=tmpl, epoch=3)
      >>> load_checkpoint(path, tmpl)["params"]["fc"]["bias"].shape
      (3,)
    """
    if match_by_order and (is_folder(path) or (os.path.isfile(path) and is_safetensors(path))):
        raise ValueError(
            f"{os.fspath(path)}: match_by_order=True pairs keys in the file's order, and a "
            "safetensors file or a Hugging Face folder keeps its keys sorted (and shards split), "
            "not in the module's order; pass rename=... to map its keys to the Flax names, or "
            "load a .pth written by torch.save(module.state_dict())"
        )
    checkpoint = read_checkpoint(path)
    state_dict = pick_section(checkpoint, which, path)
    try:
        return torch_to_flax(
            state_dict,
            template,
            prefix=prefix,
            rename=rename,
            match_by_order=match_by_order,
            strict=strict,
            cast=cast,
            flattened=flattened,
        )
    except ValueError as e:
        hint = flat_section_hint(checkpoint, state_dict) if prefix is None else ""
        raise ValueError(f"{os.fspath(path)} ({which}): {e}{hint}") from e


_LOAD_ONLY = ("which", "prefix", "template")  # load_checkpoint's options: never entries


@overload
def save_checkpoint(
    path: str | os.PathLike[str], *, net: Variables, ema_net: Variables | None = ...,
    torch_template: TorchTemplate | str | os.PathLike[str] | None = ...,
    strict: Literal[True] = ...,
    rename: Rename | None = ..., match_by_order: bool = ..., cast: bool = ...,
    flattened: FeatureMaps | None = ..., format: str | None = ...,
    max_shard_size: int | str | None = ..., overwrite: bool = ..., **extra: Any,
) -> None: ...  # fmt: skip
@overload
def save_checkpoint(
    path: str | os.PathLike[str], *, net: Variables, ema_net: Variables | None = ...,
    torch_template: TorchTemplate | str | os.PathLike[str] | None = ...,
    strict: Literal[False],
    rename: Rename | None = ..., match_by_order: bool = ..., cast: bool = ...,
    flattened: FeatureMaps | None = ..., format: str | None = ...,
    max_shard_size: int | str | None = ..., overwrite: bool = ..., **extra: Any,
) -> dict[str, Report]: ...  # fmt: skip


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    net: Variables,
    ema_net: Variables | None = None,
    torch_template: TorchTemplate | str | os.PathLike[str] | None = None,
    strict: bool = True,
    rename: Rename | None = None,
    match_by_order: bool = False,
    cast: bool = False,
    flattened: FeatureMaps | None = None,
    format: str | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    **extra: Any,
) -> dict[str, Report] | None:
    """Writes Flax variables in SuperGradients' layout, atomically (temp file, then rename).

    ``.safetensors`` paths get flat ``net.<key>``/``ema_net.<key>`` tensors with ``extra`` as
    JSON metadata, plus ``{"jema.sections": "net,ema_net"}`` (the sections written) so the file
    reads back as sections even with ``net`` alone, and ``jema.tied`` naming tied keys (stored
    twice: the format cannot share) so they read back as one. Anything else is a ``torch.save``
    dict ``{"net", "ema_net", **extra}`` that ``torch.load(weights_only=True)`` reads, written
    by ``write_checkpoint``: numpy/jax scalars in ``extra`` become Python numbers and arrays
    become tensors. Neither needs PyTorch.
    Its kernels are PyTorch-layout views of the Flax arrays' memory, written without a
    transposing copy: ``torch.load`` gives them with those strides (not contiguous), and
    ``load_state_dict`` copies them as it copies any tensor. ``ema_net`` that is ``net`` is
    converted once and stored once (its tensors shared, as ``torch.save`` shares them).

    With ``torch_template``, the file has exactly its keys, order and dtypes: tied keys (a
    GPT-2 ``lm_head.weight``) are written from their source's Flax value (the ``.pth`` keeps
    them one tensor), and PyTorch-only tensors (``num_batches_tracked``, a module's buffers,
    sinusoidal position tables) from the template, so a strict ``load_state_dict`` gives the
    converted model. For a KD model, pass ``net={"student": s, "teacher": t}`` and a template
    module with ``.student`` and ``.teacher`` to get ``student.*``/``teacher.*`` keys.

    As with ``torch.save``, a symlink is written through to its target and a file the caller may
    not write is refused (root may write any). A save killed half-way leaves the old file and a
    hidden ``.<name>.<digest>.<random>.tmp`` that the next save to the same path removes.

    A folder (an existing directory, or a path ending with ``/``; a file is an existing file or
    a name with a suffix, ``.pth.tar`` too; a new name without a suffix is refused) is written
    as a Hugging Face folder that ``from_pretrained`` loads:
    ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards of at most
    ``max_shard_size`` and ``model.safetensors.index.json``, split as ``save_pretrained``
    splits; ``format="pth"`` writes ``pytorch_model.bin`` or its shards and
    ``pytorch_model.bin.index.json`` (``torch.save`` files). With ``net`` alone it holds the
    template's keys and dtypes; in safetensors, keys tied to an earlier one (GPT-2's
    ``lm_head.weight``) are left out, as ``save_pretrained`` leaves them for ``from_pretrained``
    to tie; a ``.bin`` keeps them, one tensor. With ``ema_net`` too, it holds SuperGradients'
    layout flat, ``net.<key>`` and ``ema_net.<key>`` (as one safetensors file), which
    ``load_checkpoint`` reads as sections and ``from_pretrained`` does not load. A folder
    holds tensors only (no ``extra``). It is written into a hidden sibling folder, each file
    synced, then renamed into place (``write_folder_atomic``): an existing folder is refused
    unless ``overwrite=True``, which swaps it for the new one in one step where the OS can
    (Linux), and only when it holds nothing but weight files. A crash leaves the old folder or
    the new one, complete, plus hidden ``.<name>.<digest>.<random>.tmp`` folders that the next
    save removes; save ``config.json`` (``config.save_pretrained(folder)``) afterwards.

    Arrays sharded over several devices or processes (not fully addressable) stream: every
    process calls ``save_checkpoint``; one leaf at a time is gathered to process 0, the only
    one that writes, and waits in a file of the temporary folder (disk, not memory, until the
    shards are written, one at a time; the folder briefly needs the model's size twice). Only
    packed attention kernels, ``cast`` and ``flattened`` convert with in-memory copies. A
    process that fails alone leaves the others waiting at the final barrier.

    Args:
      path: the file or folder to write.
      net: linen variables, an nnx model or state, or a mapping of names to those.
      ema_net: the EMA weights, same kinds; omitted when None.
      torch_template: an ``nn.Module`` (needs PyTorch) or a state_dict (tensors or numpy
        arrays) giving names, order, dtypes and buffers, or a ``.pth``/``.safetensors`` file
        holding one (its ``net``, else its bare state_dict; no PyTorch needed).
      strict, rename, match_by_order, cast, flattened: as in ``flax_to_torch``;
        ``strict=False`` writes the template's values where Flax has none, and returns the
        reports; ``flattened={"fc": (C, H, W)}`` writes a Dense kernel that takes an NHWC
        flatten as the Linear after PyTorch's ``nn.Flatten`` (C, H, W order).
      format: for a folder, ``"safetensors"`` (the default) or ``"pth"``.
      max_shard_size: for a folder, the largest shard, as transformers parses it (an int of
        bytes, ``"5GB"``, the default, ``"200KB"``, ``"1GiB"``).
      overwrite: for a folder, replace one that exists.
      **extra: other entries, e.g. ``epoch=3, acc=0.91`` (files only).

    Returns:
      None; with ``strict=False``, a ``Report`` per section written (``"net"``, ``"ema_net"``).

    Raises:
      ValueError: listing mismatches against the template (strict); for ``match_by_order``
        with sorted variables or a bad ``flattened``, as ``flax_to_torch``; for a safetensors
        path, when ``extra`` has a reserved key (``jema.sections``, ``jema.tied``); naming an
        ``extra`` called like an option of ``load_checkpoint`` (``which``, ``prefix``,
        ``template``); naming ``path`` when it is neither a file name nor a folder, or
        ``format``, ``max_shard_size`` or ``overwrite`` come with a file; for a folder, naming
        a bad ``format`` or ``max_shard_size``, ``extra`` entries, or an existing folder that
        holds other files (``config.json``).
      FileExistsError: naming an existing folder, without ``overwrite=True``.
      TypeError: naming the key, before anything is written, for ``extra`` values that a
        safetensors file cannot hold as JSON or that ``torch.load(weights_only=True)`` would not
        load back (e.g. ``object()``), and for complex128 arrays in a safetensors file.
      OSError: naming ``path`` when it cannot be written (``PermissionError`` for a read-only
        file, a full disk); the old file is then left as it was.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> net = {"params": {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
      >>> save_checkpoint(path, net=net, epoch=1)
      >>> sorted(read_checkpoint(path)["net"])
      ['fc.bias', 'fc.weight']
      >>> folder = os.path.join(tempfile.mkdtemp(), "model") + os.sep
      >>> save_checkpoint(folder, net=net, max_shard_size=20)
      >>> sorted(os.listdir(folder))  # doctest: +NORMALIZE_WHITESPACE
      ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
       'model.safetensors.index.json']
    """
    shadowing = [name for name in _LOAD_ONLY if name in extra]
    if shadowing:
        raise ValueError(
            f"save_checkpoint got {', '.join(shadowing)}: options of load_checkpoint, not "
            "entries to store. Pass net=, ema_net=, torch_template=, rename=, match_by_order=, "
            "strict=, cast= and flattened= to choose what is written; other keywords are stored "
            "as entries"
        )
    folder = is_folder_target(path)
    if not folder and (format is not None or max_shard_size is not None or overwrite):
        raise ValueError(
            f"{os.fspath(path)} is a file: format=, max_shard_size= and overwrite= are for "
            "folders (a path ending with '/'); a file's suffix gives its format, and a file "
            "is always replaced"
        )
    if isinstance(torch_template, str | os.PathLike):
        torch_template = pick_section(read_checkpoint(torch_template), "net", torch_template)
    options: Options = {
        "rename": rename,
        "match_by_order": match_by_order,
        "cast": cast,
        "flattened": flattened,
    }

    def convert(trees: dict[str, Any]) -> dict[str, Any]:
        return _per_section(trees, lambda tree: state_dict(tree, torch_template, strict, options))

    trees = {"net": net} if ema_net is None else {"net": net, "ema_net": ema_net}
    if folder:
        return _save_folder(
            path, trees, convert, strict, (format, max_shard_size, overwrite), extra
        )
    converted = convert(trees)
    sections = {k: v.value if isinstance(v, Converted) else v for k, v in converted.items()}
    if os.fspath(path).endswith(".safetensors"):
        try:
            metadata = {key: json.dumps(_plain(value)) for key, value in extra.items()}
        except TypeError as e:
            raise TypeError(f"safetensors metadata must be JSON; {e}") from e
        save_safetensors(path, *to_safetensors(sections, metadata))
    else:  # one tensor per array across sections: write_pth shares what is one object
        out = {name: OrderedDict(section) for name, section in sections.items()}
        write_pth(path, {**out, **{k: _plain(v, as_arrays=True) for k, v in extra.items()}})
    return None if strict else {k: v.report for k, v in converted.items()}


def _save_folder(
    path: str | os.PathLike[str],
    trees: dict[str, Any],
    convert: Callable[[dict[str, Any]], dict[str, Any]],
    strict: bool,
    folder_options: tuple[str | None, int | str | None, bool],
    extra: Mapping[str, Any],
) -> dict[str, Report] | None:
    """``save_checkpoint`` to a Hugging Face folder (see there); ``folder_options`` are its
    ``format``, ``max_shard_size`` and ``overwrite``."""
    format, max_shard_size, overwrite = folder_options
    if extra:
        raise ValueError(
            f"{os.fspath(path)} is a folder, which holds tensors only; got the entries "
            f"{sorted(extra)}: save them in a .pth or .safetensors file (or a model's config)"
        )
    if format not in (None, "safetensors", "pth"):
        raise ValueError(f"format must be 'safetensors' or 'pth'; got {format!r}")
    max_bytes = shard_size("5GB" if max_shard_size is None else max_shard_size)
    check_replaceable(path, overwrite)
    spread = any(_spread(leaf.value) for tree in trees.values() for leaf in flatten(tree).leaves)
    writer = jax.process_index() == 0
    converted: dict[str, Any] = {}
    if spread or not writer:  # every process: the same errors, before anything is gathered
        converted = convert(_mapped(trees, _proxy))

    def write(temp: str) -> None:
        spill = os.path.join(temp, ".spill")
        hosted = _mapped(trees, _spiller(spill)) if spread else trees
        converted.update(convert(hosted))
        sections = {k: v.value if isinstance(v, Converted) else v for k, v in converted.items()}
        if len(sections) == 2:
            flat, metadata = to_safetensors(sections, {})
        else:
            flat, metadata = sections["net"], {}
            flat = untied(flat) if format != "pth" else flat
        write_folder(temp, flat, format != "pth", max_bytes, metadata)
        if spread:
            for name in os.listdir(spill):
                os.unlink(os.path.join(spill, name))
            os.rmdir(spill)

    if writer:
        write_folder_atomic(path, write)
    elif spread:  # the gathers are collectives: join each, keep nothing
        _mapped(trees, _join)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jema save_checkpoint {os.fspath(path)}")
    return None if strict else {k: v.report for k, v in converted.items()}


def _spread(value: Any) -> bool:
    """Whether a leaf is a jax.Array over several devices or processes."""
    return isinstance(value, jax.Array) and (
        not value.is_fully_addressable or len(value.sharding.device_set) > 1
    )


def _gather(value: jax.Array) -> np.ndarray:
    """The whole leaf in a new host array (a collective across processes when not addressable),
    shard by shard through the CPU device, so no host copy stays cached on ``value``."""
    if not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    host = np.empty(value.shape, value.dtype)
    cpu = jax.devices("cpu")[0]
    for shard in value.addressable_shards:
        if shard.replica_id == 0:
            host[shard.index] = np.asarray(jax.device_put(shard.data, cpu))
    return host


def _join(value: Any) -> None:
    """A process that does not write joins the gather of a spread leaf and drops it."""
    if _spread(value):
        _gather(value)


def _proxy(value: Any) -> Any:
    """A jax.Array as a numpy array of its shape and dtype holding no memory (zeros)."""
    if not isinstance(value, jax.Array) or jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended):
        return value
    return np.broadcast_to(np.zeros((), value.dtype), value.shape)


def _spiller(folder: str) -> Callable[[Any], Any]:
    """Gathers spread leaves one at a time; a large one is written to a file in ``folder``
    and given back as a read-only memory map of it, so it leaves memory before the next."""
    os.mkdir(folder)
    count = itertools.count()

    def spill(value: Any) -> Any:
        if not _spread(value):
            return value
        host = _gather(value)
        if host.nbytes < _SPILL:
            return host
        file = os.path.join(folder, f"{next(count)}.bin")
        mapped = np.memmap(file, host.dtype, "w+", shape=host.shape)
        mapped[...] = host
        mapped.flush()
        del mapped, host
        return np.memmap(file, value.dtype, "r", shape=value.shape)

    return spill


def _mapped(trees: dict[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """Each section with ``fn`` applied to its leaves."""
    return _per_section(trees, lambda tree: _map_leaves(tree, fn))


def _per_section(trees: dict[str, Any], fn: Callable[[Any], Any]) -> dict[str, Any]:
    """``fn`` of each section (``net``, and ``ema_net`` when given); ``ema_net`` that is
    ``net`` is done once and stays one object."""
    out = {"net": fn(trees["net"])}
    if "ema_net" in trees:
        out["ema_net"] = out["net"] if trees["ema_net"] is trees["net"] else fn(trees["ema_net"])
    return out


def _map_leaves(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` on every leaf, keeping linen dicts' order and nnx modules' structure."""
    if isinstance(tree, nnx.Module):
        graphdef, state = nnx.split(tree)
        return nnx.merge(graphdef, jax.tree.map(fn, state))
    if isinstance(tree, nnx.State):
        return jax.tree.map(fn, tree)
    if isinstance(tree, Mapping):
        return {key: _map_leaves(value, fn) for key, value in tree.items()}
    return fn(tree)


def _plain(value: Any, as_arrays: bool = False) -> Any:
    """Numpy/jax scalars -> Python numbers, arrays kept (or lists), recursively."""
    if isinstance(value, Mapping):
        return {k: _plain(v, as_arrays) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v, as_arrays) for v in value)
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        array = np.asarray(value)
        if array.ndim == 0:
            return array.item()
        return array if as_arrays else array.tolist()
    return value
