"""Hugging Face folders, as transformers' ``save_pretrained`` writes them and ``from_pretrained``
reads them: ``model.safetensors``, or ``model-00001-of-0000N.safetensors`` shards and
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {key:
shard}}``); likewise ``pytorch_model.bin`` and ``pytorch_model-0000i-of-0000N.bin`` with
``pytorch_model.bin.index.json``. Every rule of that format lives here: which file a folder is
read from, how a state_dict is split into shards, the shard sizes, and which paths are folders.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from interop._dtypes import is_array
from interop._files import is_safetensors, read_safetensors, save_safetensors, write_atomic
from interop._pth import read_pth, write_pth
from interop._report import few

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# from_pretrained's order: the first of these a folder holds is what it loads.
SOURCES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")  # the usual suffixes, for messages
FORMAT = {"format": "pt"}  # the metadata save_pretrained gives safetensors shards
_WRITTEN = re.compile(
    r"(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)(\.index\.json)?"
)
_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


class Folder(NamedTuple):
    """What a Hugging Face folder holds, read without copies.

    Attributes:
      state_dict: every key -> its memory-mapped, read-only array, shard after shard.
      metadata: the safetensors shards' metadata, merged (``{}`` for ``.bin`` shards).
      files: the weight files read (the index first, when there is one).
    """

    state_dict: dict[str, np.ndarray]
    metadata: dict[str, str]
    files: tuple[str, ...]


def is_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``read_checkpoint`` reads ``path`` as a Hugging Face folder.

    Args:
      path: a checkpoint path.

    Returns:
      True for a directory or a ``*.index.json`` file.

    Example:
      >>> is_folder("bert/model.safetensors.index.json"), is_folder("ckpt.pth")
      (True, False)
    """
    return os.fspath(path).endswith(".index.json") or os.path.isdir(path)


def read_folder(path: str | os.PathLike[str]) -> Folder:
    """Reads a Hugging Face folder's weights as ``from_pretrained`` picks them.

    The first of ``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin``
    and ``pytorch_model.bin.index.json`` the folder holds is read, as ``from_pretrained`` reads
    it; an index names the shard of every key (``weight_map``), which is authoritative: keys a
    shard holds and the index does not map to it are left out. Shards are read with
    ``read_safetensors`` or ``read_pth`` (told apart by content), memory-mapped, never copied.

    Args:
      path: the folder, or its ``*.index.json`` file.

    Returns:
      A ``Folder``: the merged state_dict, its shards' metadata and the files read.

    Raises:
      FileNotFoundError: when ``path`` does not exist.
      OSError: naming a file that cannot be read.
      ValueError: naming the folder and the file for a folder with none of the four files, a
        malformed index (not JSON, no ``weight_map`` of names to plain file names in the
        folder), a shard the index names and the folder lacks, a key the index maps to a
        shard that lacks it, or a file holding something other than a state_dict.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     write_folder(folder, {"fc.weight": np.ones((2, 2), np.float32)}, True, 100)
      ...     sorted(os.listdir(folder)), list(read_folder(folder).state_dict)
      (['model.safetensors'], ['fc.weight'])
    """
    path = os.fspath(path)
    if path.endswith(".index.json"):
        folder, source = os.path.split(path)
        folder = folder or "."
        if not os.path.isfile(path):
            raise FileNotFoundError(2, "No such index file", path)
    else:
        folder = path
        found = [name for name in SOURCES if os.path.isfile(os.path.join(folder, name))]
        if not found:
            raise ValueError(
                f"{folder}: a Hugging Face folder holds one of {', '.join(SOURCES)}; this "
                f"one has none (it holds {few(sorted(os.listdir(folder)), most=5) or 'nothing'})"
            )
        source = found[0]
    if not source.endswith(".index.json"):
        file = os.path.join(folder, source)
        return Folder(*_read_shard(file, folder), (file,))
    index = os.path.join(folder, source)
    weight_map = _weight_map(index, folder)
    out: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    files = [index]
    by_shard: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        by_shard.setdefault(name, []).append(key)
    for shard in sorted(by_shard):
        file = os.path.join(folder, shard)
        if not os.path.isfile(file):
            raise ValueError(f"{folder}: {source} names the shard {shard}, which is missing")
        content, shard_metadata = _read_shard(file, folder)
        lacking = [key for key in by_shard[shard] if key not in content]
        if lacking:
            raise ValueError(
                f"{folder}: {source} maps {few(list(map(repr, lacking)), most=3)} to {shard}, "
                f"which lacks "
                f"{'them' if len(lacking) > 1 else 'it'}"
            )
        out.update((key, content[key]) for key in content if weight_map.get(key) == shard)
        metadata.update(shard_metadata)
        files.append(file)
    return Folder(out, metadata, tuple(files))


def _weight_map(index: str, folder: str) -> dict[str, str]:
    """The index's ``weight_map``, checked: keys -> plain file names in the folder."""
    name = os.path.basename(index)
    try:
        with open(index, encoding="utf-8") as f:
            content = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{folder}: {name} is not a JSON index: {e}") from e
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    metadata = content.get("metadata", {}) if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(metadata, dict):
        raise ValueError(
            f"{folder}: {name} must be a JSON object with a 'weight_map' of key -> shard file "
            "(and an optional 'metadata' object), as save_pretrained writes"
        )
    bad = [
        f"{key!r}: {shard!r}"
        for key, shard in weight_map.items()
        if not isinstance(shard, str)
        or shard in ("", ".", "..")
        or os.path.basename(shard) != shard
    ]
    if bad:
        raise ValueError(
            f"{folder}: {name} must map keys to file names in the folder; got {few(bad, most=3)}"
        )
    return weight_map


def _read_shard(file: str, folder: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A weight file's state_dict and metadata; anything but a state_dict is refused."""
    if is_safetensors(file):
        return read_safetensors(file)
    content = read_pth(file)
    if not (isinstance(content, Mapping) and all(isinstance(k, str) for k in content)) or not all(
        map(is_array, content.values())
    ):
        raise ValueError(
            f"{folder}: {os.path.basename(file)} must hold a state_dict (names -> tensors), as "
            f"save_pretrained writes; it holds a {type(content).__name__} with other values"
        )
    return dict(content), {}


def is_folder_target(path: str | os.PathLike[str]) -> bool:
    """Whether ``save_checkpoint`` writes ``path`` as a Hugging Face folder, never by a guess.

    A folder: an existing directory, or a path ending with a separator (``"out/bert/"``). A
    file: an existing file (also a device or FIFO), or a name with a suffix (``.pth``,
    ``.safetensors``, ``.pth.tar``, as ``torch.save`` takes any). A new name without a suffix
    is refused.

    Args:
      path: where to save.

    Returns:
      True for a folder, False for a file.

    Raises:
      ValueError: naming ``path`` when it is neither, with both spellings to choose from.

    Example:
      >>> is_folder_target("out/bert/"), is_folder_target("out/ckpt.pth.tar")
      (True, False)
    """
    text = os.fspath(path)
    if text.endswith(tuple(filter(None, (os.sep, os.altsep)))) or os.path.isdir(text):
        return True
    if os.path.lexists(text) or os.path.splitext(os.path.basename(text))[1]:
        return False
    raise ValueError(
        f"{text!r} is neither a file name (one with a suffix, e.g. {', '.join(FILE_SUFFIXES)}) "
        f"nor a folder (an existing directory or a path ending with {os.sep!r}): add a suffix "
        "to write one file, "
        f"or write {text + os.sep!r} for a Hugging Face folder"
    )


def check_replaceable(folder: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuses to write over an existing folder, unless ``overwrite`` and the folder holds only
    weight files (a replaced folder loses everything in it).

    Args:
      folder: where a folder is to be written.
      overwrite: whether an existing folder may be replaced.

    Raises:
      FileExistsError: naming the folder when it exists, holds something, and ``overwrite`` is
        False (an empty folder is written without it).
      ValueError: naming the folder and its first other entries (``config.json``, a
        subfolder) when it holds anything but the files ``save_checkpoint`` writes.
      NotADirectoryError: when ``folder`` is a file.

    Example:
      >>> import tempfile
      >>> check_replaceable(tempfile.mkdtemp(), overwrite=True)
    """
    folder = os.fspath(folder)
    bare = folder.rstrip(os.sep + (os.altsep or "")) or folder  # "f.pth/" names the file f.pth
    if not os.path.lexists(bare):
        return
    if not os.path.isdir(bare):
        raise NotADirectoryError(20, "Not a folder: save_checkpoint writes a folder here", folder)
    if not os.listdir(bare):  # an empty folder loses nothing
        return
    if not overwrite:
        raise FileExistsError(
            17, "Folder exists: pass overwrite=True to replace it (atomically)", folder
        )
    others = sorted(
        name
        for name in os.listdir(bare)
        if not (_WRITTEN.fullmatch(name) and os.path.isfile(os.path.join(bare, name)))
    )
    if others:
        raise ValueError(
            f"{folder}: overwrite=True replaces the whole folder, and it holds "
            f"{few(others, most=5)}, which save_checkpoint does not write; move them away or "
            "save to another folder (and config.save_pretrained(folder) afterwards)"
        )


def shard_size(size: int | str) -> int:
    """A shard size in bytes, parsed as transformers' ``convert_file_size_to_int`` parses it.

    Args:
      size: bytes as an int, or digits and a unit: ``GiB``/``MiB``/``KiB`` (powers of 2),
        ``GB``/``MB``/``KB`` (powers of 10; with a lowercase final ``b``, e.g. ``"5Gb"``, bits).

    Returns:
      The size in bytes, at least 1.

    Raises:
      ValueError: naming the value when it is not such a size or is not positive.
      TypeError: for anything but an int or a str.

    Example:
      >>> shard_size("5GB"), shard_size("200 KB"), shard_size("1MiB"), shard_size("8Kb")
      (5000000000, 200000, 1048576, 1000)
    """
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise TypeError(f"max_shard_size must be an int or a str like '5GB'; got {size!r}")
    out = size if isinstance(size, int) else None
    if isinstance(size, str):
        for unit, scale in _UNITS.items():
            digits = size[: -len(unit)].strip()  # int() takes "5 GB" and " 5GB"
            if size.upper().endswith(unit) and digits.isascii() and digits.isdigit():
                bits = scale % 1000 == 0 and size.endswith("b")
                out = int(digits) * scale // (8 if bits else 1)
                break
    if out is None or out < 1:
        raise ValueError(
            f"max_shard_size must be a positive int of bytes or digits with a unit (GiB, MiB, "
            f"KiB, GB, MB, KB; e.g. '5GB', '200KB'); got {size!r}"
        )
    return out


def split(state_dict: Mapping[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """The keys of each shard, split as ``save_pretrained`` splits them.

    Keys are taken in order and a shard is closed when the next array would take it past
    ``max_bytes``; an array larger than that gets a shard of its own. Keys holding one array
    (tied keys) go to the shard of the first of them and count once.

    Args:
      state_dict: names -> arrays, in the order to write.
      max_bytes: the largest shard, in bytes.

    Returns:
      The keys of each shard, in order.

    Example:
      >>> w = np.zeros(10, np.float32)
      >>> split({"a": w, "b": np.zeros(10, np.float32), "tied": w}, 60)
      [['a', 'tied'], ['b']]
    """
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    home: dict[int, list[str]] = {}  # id of an array -> the shard holding it
    for key, array in state_dict.items():
        if id(array) in home:
            home[id(array)].append(key)
            continue
        if array.nbytes > max_bytes:
            shards.append([key])
            home[id(array)] = shards[-1]
            continue
        if current and size + array.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        home[id(array)] = current
        size += array.nbytes
    return [*shards, current] if current else shards


def untied(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state_dict with each array under its first key only, as ``save_pretrained`` writes
    safetensors files: ``from_pretrained`` ties the other keys again (GPT-2's
    ``lm_head.weight``, BERT's ``cls.predictions.decoder.weight``).

    Args:
      state_dict: names -> arrays; tied keys hold one array object.

    Returns:
      A new dict without the later keys of each array.

    Example:
      >>> w = np.zeros(2)
      >>> list(untied({"wte.weight": w, "bias": np.ones(1), "lm_head.weight": w}))
      ['wte.weight', 'bias']
    """
    seen: set[int] = set()
    out = {}
    for key, array in state_dict.items():
        if id(array) not in seen:
            seen.add(id(array))
            out[key] = array
    return out


def write_folder(
    folder: str,
    state_dict: Mapping[str, np.ndarray],
    safetensors: bool,
    max_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes a state_dict into an existing (empty) folder as ``save_pretrained`` does.

    One ``model.safetensors`` (or ``pytorch_model.bin``) when it fits in one shard, else
    ``model-0000i-of-0000N.safetensors`` (``pytorch_model-0000i-of-0000N.bin``) and the index
    (``json.dumps(indent=2, sort_keys=True)`` and a newline). Safetensors shards get the
    ``{"format": "pt"}`` metadata (and ``metadata``); ``.bin`` shards are ``torch.save``
    dicts of tensors, tied keys one tensor. Shards are written one at a time.

    Args:
      folder: an existing folder (``save_checkpoint`` passes a temporary one).
      state_dict: names -> arrays, in order; keys to store once are already left out.
      safetensors: safetensors shards, else ``.bin`` shards.
      max_bytes: the largest shard, in bytes (``shard_size``).
      metadata: more safetensors metadata, strings -> strings (ignored for ``.bin``).

    Raises:
      TypeError: as ``save_safetensors`` and ``write_pth``.
      OSError: when a file cannot be written.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as folder:
      ...     arrays = {"a": np.zeros(8, np.float32), "b": np.zeros(8, np.float32)}
      ...     write_folder(folder, arrays, False, 40)
      ...     sorted(os.listdir(folder))  # doctest: +NORMALIZE_WHITESPACE
      ['pytorch_model-00001-of-00002.bin', 'pytorch_model-00002-of-00002.bin',
       'pytorch_model.bin.index.json']
    """
    shards = split(state_dict, max_bytes)
    name = SAFE_WEIGHTS_NAME if safetensors else WEIGHTS_NAME
    stem, suffix = os.path.splitext(name)
    names = (
        [name]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{suffix}" for i in range(len(shards))]
    )
    for shard, keys in zip(names, shards, strict=True):
        arrays = {key: state_dict[key] for key in keys}
        path = os.path.join(folder, shard)
        if safetensors:
            save_safetensors(path, arrays, {**FORMAT, **(metadata or {})})
        else:
            write_pth(path, dict(arrays))
    if len(shards) == 1:
        return
    sizes = {id(array): array.nbytes for array in state_dict.values()}
    index: dict[str, Any] = {
        "metadata": {"total_size": sum(sizes.values())},
        "weight_map": {
            key: shard for shard, keys in zip(names, shards, strict=True) for key in keys
        },
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    index_name = SAFE_WEIGHTS_INDEX_NAME if safetensors else WEIGHTS_INDEX_NAME

    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(os.path.join(folder, index_name), write)
