"""SuperGradients' checkpoint schema: the ``net`` and ``ema_net`` sections, bare state_dicts,
and, in safetensors files and Hugging Face folders, ``<section>.<key>`` names, the
``jema.sections`` marker and the ``jema.tied`` record of tied keys (the format cannot share a
tensor between keys)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from interop._dtypes import is_array
from interop._files import is_safetensors, read_safetensors
from interop._hf import is_folder, read_folder
from interop._leftovers import same_bits
from interop._names import all_under
from interop._pth import read_pth
from interop._report import few

SECTIONS = ("net", "ema_net")
BARE = "state_dict"  # what ``sections`` calls a bare state_dict
MARKER = "jema.sections"  # safetensors metadata: the sections ``to_safetensors`` wrote
TIES = "jema.tied"  # safetensors metadata: JSON {alias key: source key} of keys holding one array


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Reads a checkpoint file or a Hugging Face folder the safe way, as SuperGradients lays
    it out.

    A safetensors file becomes sections (``{"net": {...}, "ema_net": {...}}``, keys without
    their ``<section>.``) when its metadata has the ``jema.sections`` marker ``save_checkpoint``
    writes (e.g. ``"net,ema_net"``), or when every key starts with ``net.`` or ``ema_net.`` and
    both occur; any other safetensors file, e.g. one whose keys all start with ``net.`` and no
    marker (a model whose only child is ``self.net``), is a bare state_dict.

    A ``torch.save`` file is read as ``torch.load(weights_only=True)`` reads it, with numpy
    arrays for tensors and without PyTorch (``read_pth``: read-only, memory-mapped, safe by
    construction); a safetensors file as numpy arrays too (``read_safetensors``).

    A Hugging Face folder (a directory, or its ``*.index.json``) is read as ``from_pretrained``
    picks its files (``interop._hf.read_folder``): its shards merged into one memory-mapped
    state_dict, then split into sections as one safetensors file would be (a folder
    ``save_checkpoint`` wrote with ``ema_net`` holds ``net.``/``ema_net.`` keys).

    Args:
      path: a ``torch.save`` file or a safetensors file (told apart by content, not name), or
        a Hugging Face folder.

    Returns:
      What the file holds: usually a dict of sections and other entries, or a state_dict.

    Raises:
      OSError: when the file cannot be opened.
      ValueError: naming the file when it is unreadable, unsafe (naming the globals it needs),
        or its marker lists sections other than ``net`` and ``ema_net``; for a folder, as
        ``read_folder`` (naming the folder and the file).

    Example:
      >>> import tempfile
      >>> from interop._files import save_safetensors
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     path = os.path.join(folder, "ckpt.safetensors")
      ...     save_safetensors(path, {"net.w": np.ones(1, np.float32)}, {MARKER: "net"})
      ...     read_checkpoint(path)
      {'net': {'w': array([1.], dtype=float32)}}
    """
    if is_folder(path):
        folder = read_folder(path)
        return _sectioned(folder.state_dict, folder.metadata, path)
    if not is_safetensors(path):
        return read_pth(path)
    return _sectioned(*read_safetensors(path), path)


def _sectioned(
    content: dict[str, Any], metadata: Mapping[str, str], path: str | os.PathLike[str]
) -> Any:
    """Flat ``<section>.<key>`` tensors as sections, by the marker or the keys, ties restored."""
    try:
        tied = json.loads(metadata.get(TIES, "{}"))
        for alias, source in tied.items():  # one array again, where the bits still agree
            if same_bits(content.get(alias), content.get(source)):
                content[alias] = content[source]
    except (ValueError, AttributeError, TypeError) as e:
        raise ValueError(
            f"{os.fspath(path)}: metadata {TIES!r} must be a JSON object of key -> key ({e})"
        ) from e
    heads = [key.partition(".") for key in content]
    if MARKER in metadata:
        listed = [s for s in metadata[MARKER].split(",") if s]
        if not set(listed) <= set(SECTIONS):
            raise ValueError(
                f"{os.fspath(path)}: metadata {MARKER!r} must list sections out of "
                f"{list(SECTIONS)}; got {metadata[MARKER]!r}"
            )
    elif {head for head, dot, _ in heads if dot} == set(SECTIONS) and all(
        dot and head in SECTIONS for head, dot, _ in heads
    ):
        listed = list(SECTIONS)
    else:
        return content
    out: dict[str, Any] = {section: {} for section in listed}
    for (head, dot, name), (key, tensor) in zip(heads, content.items(), strict=True):
        if dot and head in out:
            out[head][name] = tensor
        else:
            out[key] = tensor
    return out


def to_safetensors(
    sections: Mapping[str, Mapping[str, np.ndarray]], metadata: Mapping[str, str]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Sections as one flat safetensors dict, and the metadata with the section marker.

    The marker ``{"jema.sections": "net,ema_net"}`` (the sections written) lets
    ``read_checkpoint`` split the file into sections even when only ``net`` is there. Keys of a
    section that hold one array (tied keys, as ``flax_to_torch`` fills them) are recorded under
    ``jema.tied``, so that ``read_checkpoint`` gives them one array again.

    Args:
      sections: section names (``net``, ``ema_net``) -> state_dicts.
      metadata: strings -> strings.

    Returns:
      ``<section>.<key>`` -> array, and the metadata with the marker.

    Raises:
      ValueError: when ``sections`` names something other than ``net``/``ema_net``, or
        ``metadata`` has the key ``jema.sections`` or ``jema.tied``.

    Example:
      >>> w = np.ones(2)
      >>> to_safetensors({"net": {"w": w, "head": w}}, {"epoch": "1"})[1]
      {'epoch': '1', 'jema.sections': 'net', 'jema.tied': '{"net.head": "net.w"}'}
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"sections must be out of {list(SECTIONS)}; got {unknown}")
    reserved = [key for key in (MARKER, TIES) if key in metadata]
    if reserved:
        raise ValueError(f"metadata key {reserved[0]!r} is reserved for interop; rename it")
    flat, tied = {}, {}
    for section, state_dict in sections.items():
        first: dict[int, str] = {}  # id of an array -> the first key holding it
        for key, array in state_dict.items():
            flat[f"{section}.{key}"] = array
            source = first.setdefault(id(array), key)
            if source != key:
                tied[f"{section}.{key}"] = f"{section}.{source}"
    out = {**metadata, MARKER: ",".join(sections)}
    return flat, out | {TIES: json.dumps(tied)} if tied else out


def sections(
    checkpoint: Mapping[str, Any], path: str | os.PathLike[str]
) -> dict[str, Mapping[str, Any]]:
    """The state_dicts a checkpoint dict holds, by name, each checked to map names to arrays.

    Args:
      checkpoint: a dict read by ``read_checkpoint``.
      path: the file, for error messages.

    Returns:
      The ``net`` and ``ema_net`` entries that are dicts, or ``{BARE: checkpoint}`` when there
      are none and every value is an array or tensor (a bare state_dict), else ``{}``.

    Raises:
      ValueError: naming the file and the section when a present ``net``/``ema_net`` is not a
        dict (None, a list, a tensor beside other entries), or its first bad keys when it has a
        key that is not a string or a value that is not an array or tensor.

    Example:
      >>> list(sections({"net": {}, "ema_net": {}, "epoch": 3}, "ckpt.pth"))
      ['net', 'ema_net']
      >>> list(sections({"net": np.ones(2), "head.bias": np.ones(2)}, "ckpt.pth"))
      ['state_dict']
      >>> sections({"net": {"fc.bias": 3}}, "ckpt.pth")
      Traceback (most recent call last):
      ValueError: ckpt.pth: 'net' must map str names to arrays or tensors; got 'fc.bias': int
      >>> sections({"net": {}, "ema_net": None}, "ckpt.pth")
      Traceback (most recent call last):
      ValueError: ckpt.pth: 'ema_net' is a NoneType, not a state_dict of names to tensors
    """
    if checkpoint and all(map(is_array, checkpoint.values())):
        found: dict[str, Mapping[str, Any]] = {BARE: checkpoint}
    else:
        found = {s: checkpoint[s] for s in SECTIONS if s in checkpoint}
    for name, section in found.items():
        if not isinstance(section, Mapping):
            raise ValueError(
                f"{os.fspath(path)}: {name!r} is a {type(section).__name__}, not a state_dict "
                "of names to tensors"
            )
    for name, state_dict in found.items():
        bad = [
            f"{k!r}: {type(v).__name__}" if isinstance(k, str) else f"key {k!r}: {type(k).__name__}"
            for k, v in state_dict.items()
            if not (isinstance(k, str) and is_array(v))
        ]
        if bad:
            raise ValueError(
                f"{os.fspath(path)}: {name!r} must map str names to arrays or tensors; got "
                f"{few(bad, most=3)}"
            )
    return found


def pick_section(checkpoint: Any, which: str, path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The state_dict to load from a checkpoint read from ``path``.

    Args:
      checkpoint: what ``read_checkpoint(path)`` returned.
      which: ``"auto"`` (``ema_net`` when present, else ``net``, else a bare state_dict),
        ``"net"`` or ``"ema_net"``.
      path: the file, for error messages.

    Returns:
      The chosen section, or ``checkpoint`` itself when it is a bare state_dict.

    Raises:
      ValueError: for an unknown ``which``, a checkpoint that is not a dict, or a section the
        file lacks (listing the keys it has).

    Example:
      >>> ckpt = {"net": {"w": np.zeros(1)}, "ema_net": {"w": np.ones(1)}}
      >>> pick_section(ckpt, "auto", "ckpt.pth")
      {'w': array([1.])}
    """
    if which not in ("auto", *SECTIONS):
        raise ValueError(f"which must be 'auto', 'net' or 'ema_net'; got {which!r}")
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    found = sections(checkpoint, path)
    keys = sorted(map(str, checkpoint))[:20]
    if BARE in found:
        if which == "ema_net":
            raise ValueError(f"{path} is a bare state_dict with no 'ema_net'; use which='net'")
        return checkpoint
    if not found:
        raise ValueError(f"{path} has no 'net' or 'ema_net' and is not a state_dict; keys: {keys}")
    chosen = ("ema_net" if "ema_net" in found else "net") if which == "auto" else which
    if chosen not in found:
        raise ValueError(f"{path} has no {chosen!r}; its keys are {keys}")
    return found[chosen]


def flat_section_hint(checkpoint: Any, state_dict: Mapping[str, Any]) -> str:
    """A hint for a file read as a bare state_dict whose keys all start with ``net.``.

    Args:
      checkpoint: what ``read_checkpoint`` returned.
      state_dict: what ``pick_section`` chose from it.

    Returns:
      The hint to add to an error (starting with ``"; "``), or ``""``.

    Example:
      >>> sd = {"net.fc.bias": np.zeros(1)}
      >>> flat_section_hint(sd, sd).startswith("; every key starts with 'net.'")
      True
    """
    if state_dict is not checkpoint or not all_under(state_dict, "net."):
        return ""
    return (
        "; every key starts with 'net.' and the file is read as a bare state_dict: if "
        "they are one SuperGradients section written flat, pass prefix='net.'"
    )
