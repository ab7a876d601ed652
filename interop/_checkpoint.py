"""Loading Flax variables from SuperGradients-style checkpoints and saving them back."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal, Unpack, overload

import jax
import numpy as np

from interop._convert import Options, state_dict, torch_to_flax
from interop._files import save_safetensors
from interop._layouts import FeatureMaps
from interop._names import Rename
from interop._pth import write_pth
from interop._report import Converted, Report
from interop._schema import flat_section_hint, pick_section, read_checkpoint, to_safetensors
from interop._types import TorchTemplate, Variables


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
    """Loads ``net`` or ``ema_net`` from a ``.pth``/``.safetensors`` file into a Flax template.

    Args:
      path: a ``torch.save`` checkpoint (SuperGradients layout or a bare state_dict) or a
        safetensors file, read by ``read_checkpoint`` (no PyTorch needed).
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
        mismatches (strict); for bad options, as ``torch_to_flax``.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> tmpl = {"params": {"fc": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}}
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
      >>> save_checkpoint(path, net=tmpl, ema_net=tmpl, epoch=3)
      >>> load_checkpoint(path, tmpl)["params"]["fc"]["bias"].shape
      (3,)
    """
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
    flattened: FeatureMaps | None = ..., **extra: Any,
) -> None: ...  # fmt: skip
@overload
def save_checkpoint(
    path: str | os.PathLike[str], *, net: Variables, ema_net: Variables | None = ...,
    torch_template: TorchTemplate | str | os.PathLike[str] | None = ...,
    strict: Literal[False],
    rename: Rename | None = ..., match_by_order: bool = ..., cast: bool = ...,
    flattened: FeatureMaps | None = ..., **extra: Any,
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

    Args:
      path: the file to write.
      net: linen variables, an nnx model or state, or a mapping of names to those.
      ema_net: the EMA weights, same kinds; omitted when None.
      torch_template: an ``nn.Module`` (needs PyTorch) or a state_dict (tensors or numpy
        arrays) giving names, order, dtypes and buffers, or a ``.pth``/``.safetensors`` file
        holding one (its ``net``, else its bare state_dict; no PyTorch needed).
      strict, rename, match_by_order, cast, flattened: as in ``flax_to_torch``;
        ``strict=False`` writes the template's values where Flax has none, and returns the
        reports; ``flattened={"fc": (C, H, W)}`` writes a Dense kernel that takes an NHWC
        flatten as the Linear after PyTorch's ``nn.Flatten`` (C, H, W order).
      **extra: other entries, e.g. ``epoch=3, acc=0.91``.

    Returns:
      None; with ``strict=False``, a ``Report`` per section written (``"net"``, ``"ema_net"``).

    Raises:
      ValueError: listing mismatches against the template (strict); for ``match_by_order``
        with sorted variables or a bad ``flattened``, as ``flax_to_torch``; for a safetensors
        path, when ``extra`` has a reserved key (``jema.sections``, ``jema.tied``); naming an
        ``extra`` called like an option of ``load_checkpoint`` (``which``, ``prefix``,
        ``template``).
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
    """
    shadowing = [name for name in _LOAD_ONLY if name in extra]
    if shadowing:
        raise ValueError(
            f"save_checkpoint got {', '.join(shadowing)}: options of load_checkpoint, not "
            "entries to store. Pass net=, ema_net=, torch_template=, rename=, match_by_order=, "
            "strict=, cast= and flattened= to choose what is written; other keywords are stored "
            "as entries"
        )
    safetensors = os.fspath(path).endswith(".safetensors")
    if isinstance(torch_template, str | os.PathLike):
        torch_template = pick_section(read_checkpoint(torch_template), "net", torch_template)
    options: Options = {
        "rename": rename,
        "match_by_order": match_by_order,
        "cast": cast,
        "flattened": flattened,
    }
    converted: dict[str, Any] = {"net": state_dict(net, torch_template, strict, options)}
    if ema_net is not None:
        same = ema_net is net
        converted["ema_net"] = (
            converted["net"] if same else state_dict(ema_net, torch_template, strict, options)
        )
    sections = {k: v.value if isinstance(v, Converted) else v for k, v in converted.items()}
    if safetensors:
        try:
            metadata = {key: json.dumps(_plain(value)) for key, value in extra.items()}
        except TypeError as e:
            raise TypeError(f"safetensors metadata must be JSON; {e}") from e
        save_safetensors(path, *to_safetensors(sections, metadata))
    else:  # one tensor per array across sections: write_pth shares what is one object
        out = {name: OrderedDict(section) for name, section in sections.items()}
        write_pth(path, {**out, **{k: _plain(v, as_arrays=True) for k, v in extra.items()}})
    return None if strict else {k: v.report for k, v in converted.items()}


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
