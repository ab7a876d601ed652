"""The post-hoc snapshot folder's format (described in :mod:`jema.posthoc`): which folders are
snapshots, the names of their items and leaves, and the metadata schema, checked field by field
before anything is read."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jema._orbax import check_new_step, open_manager
from jema._power import check_sigma_rel, width_key

FORMAT = "jema.posthoc/1"
METADATA = "metadata"
PARTS = ("params", "batch_stats")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
STEP_NAME = re.compile(r"[0-9]+")  # the folder names orbax reads as steps
RECORD_FIELDS = {"path", "shape", "dtype"}
METADATA_FIELDS = {"format", "step", "sigma_rels", "dtype", "params"}  # and maybe "batch_stats"


def read_index(directory: Any, steps: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The checked metadata of the snapshots at ``steps`` (None: all), by step; nothing is
    created.

    Args:
      directory: the snapshot folder.
      steps: the steps wanted, or None for every snapshot in the folder.

    Returns:
      One metadata dict per snapshot, sorted by step.

    Raises:
      FileNotFoundError: no such folder, or no snapshot at a wanted step.
      ValueError: naming the folder or file of a damaged or foreign snapshot.

    Example:
      >>> import tempfile
      >>> read_index(tempfile.mkdtemp())
      []
    """
    path = check_path(directory)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no snapshot folder {path!r}")
    saved = _snapshot_steps(path)
    missing = sorted(set(steps or ()) - set(saved))
    if missing:
        raise FileNotFoundError(
            f"no snapshot step {missing[0]!r} in {path!r}; saved steps: {saved}"
        )
    with open_manager(path, None) as manager:
        return [
            _read_metadata(manager, path, step)
            for step in (saved if steps is None else sorted(steps))
        ]


def _snapshot_steps(path: str) -> list[int]:
    """The steps of the snapshot folders in ``path``, sorted: the folders named by a step that
    hold a snapshot item (its metadata or a stored tree). Others are not the snapshots'."""
    steps = []
    with os.scandir(path) as entries:
        for entry in entries:
            if not (STEP_NAME.fullmatch(entry.name) and entry.is_dir()):
                continue
            with os.scandir(entry.path) as inside:
                if not any(_is_snapshot_item(item.name) for item in inside):
                    continue
            if entry.name != str(int(entry.name)):
                raise ValueError(
                    f"the snapshot folder {entry.path!r} is not named by its step: orbax reads "
                    f"step {int(entry.name)} from the folder {str(int(entry.name))!r}; rename it"
                )
            steps.append(int(entry.name))
    return sorted(steps)


def _is_snapshot_item(name: str) -> bool:
    return name == METADATA or name.startswith(tuple(f"{part}-" for part in PARTS))


def check_new_snapshot_step(manager: ocp.CheckpointManager, step: int) -> None:
    """Refuse a step saved in the folder or below a saved one (:func:`check_new_step`, counting
    only the folders that hold a snapshot), or whose folder name another kind of folder
    holds.

    Args:
      manager: the orbax manager of the snapshot folder.
      step: the step about to be saved.

    Raises:
      ValueError: naming the step and what is in its way.

    Example:
      >>> import os, tempfile
      >>> folder = tempfile.mkdtemp()
      >>> os.mkdir(os.path.join(folder, "5"))
      >>> with open_manager(folder, None) as manager:
      ...     check_new_snapshot_step(manager, 5)
      Traceback (most recent call last):
      ValueError: ...5' is in the way of snapshot step 5: it holds no jema snapshot; ...
    """
    path = os.fspath(manager.directory)
    check_new_step(manager, step, "snapshot", saved=_snapshot_steps(path))
    if os.path.lexists(os.path.join(path, str(step))):
        raise ValueError(
            f"{os.path.join(path, str(step))!r} is in the way of snapshot step {step}: it holds "
            "no jema snapshot; move it out of the snapshot folder"
        )


def _read_metadata(manager: ocp.CheckpointManager, path: str, step: int) -> dict[str, Any]:
    """The metadata of the snapshot at ``step``, checked (:func:`_check_metadata`) and with
    every item it lists present."""
    folder = os.path.join(path, str(step))
    if not os.path.isdir(os.path.join(folder, METADATA)):
        raise ValueError(
            f"the snapshot folder {folder!r} holds stored trees but no {METADATA!r}: a damaged "
            "snapshot; delete the step folder"
        )
    where = _metadata_file(folder)
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(**{METADATA: ocp.args.JsonRestore()})
        )
        metadata = restored[METADATA]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot read the snapshot metadata {where!r} ({' '.join(str(e).split())[:200]}); "
            "delete the step folder"
        ) from e
    checked = _check_metadata(metadata, step, folder)
    parts = [part for part in PARTS if part in checked]
    lost = [
        item_name(p, w)
        for p in parts
        for w in checked["sigma_rels"]
        if not os.path.isdir(os.path.join(folder, item_name(p, w)))
    ]
    if lost:
        raise ValueError(
            f"the snapshot folder {folder!r} lacks the items {lost} its metadata lists: a "
            "damaged snapshot; delete the step folder"
        )
    return checked


def _metadata_file(folder: str) -> str:
    """The file of a step folder's metadata (orbax keeps a JSON item in a file of its name)."""
    return os.path.join(folder, METADATA, METADATA)


def _check_metadata(metadata: Any, step: int, folder: str) -> dict[str, Any]:
    """``metadata`` when it is a jema snapshot's for its ``folder``, that of ``step``: every
    field of its type and range, the widths distinct, the leaf paths one tree's.

    Raises:
      ValueError: naming the metadata file (the folder, for a step that is not its own).
    """
    where = _metadata_file(folder)

    def broken(what: str) -> ValueError:
        return ValueError(f"broken snapshot metadata {where!r}: {what}; delete the step folder")

    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"{where!r} is not a jema snapshot's metadata (no {FORMAT!r} format); keep "
            "snapshots in a folder of their own"
        )
    fields = set(metadata)
    if not METADATA_FIELDS <= fields <= METADATA_FIELDS | {"batch_stats"}:
        raise broken(
            f"fields {sorted(fields)}; a snapshot's are {sorted(METADATA_FIELDS)} and maybe "
            "'batch_stats'"
        )
    saved = metadata["step"]
    if not _is_int(saved) or saved < 1:
        raise broken(f"step {saved!r} is not a positive int")
    if saved != step:
        raise ValueError(
            f"the snapshot folder {folder!r} holds the metadata of step {saved} (copied or "
            "renamed?): a snapshot's folder is named by its step; put it back in the folder "
            f"{str(saved)!r} or delete it"
        )
    widths = metadata["sigma_rels"]
    if not isinstance(widths, list) or not widths:
        raise broken(f"sigma_rels {widths!r} is not a non-empty list of widths")
    for width in widths:
        try:
            if not isinstance(width, (int, float)):
                raise ValueError(f"sigma_rel must be a number; got {width!r}")
            check_sigma_rel(width)
        except ValueError as e:
            raise broken(f"sigma_rels {widths!r}: {e}") from e
    if len(set(widths)) != len(widths):
        raise broken(f"sigma_rels {widths!r} repeat a width")
    if metadata["dtype"] is not None and metadata["dtype"] not in STORAGE_DTYPES:
        raise broken(f"dtype {metadata['dtype']!r} is not null or one of {STORAGE_DTYPES}")
    for part in PARTS:
        if part in metadata:
            _check_records(metadata[part], part, broken)
    return metadata


def _check_records(records: Any, part: str, broken: Any) -> None:
    """Each leaf record of ``part``: its path (str and int keys), shape and dtype; the paths
    those of one tree (distinct, none inside another)."""
    if not isinstance(records, list):
        raise broken(f"{part} {records!r} is not a list of leaf records")
    paths = []
    for record in records:
        if not isinstance(record, dict) or set(record) != RECORD_FIELDS:
            raise broken(f"{part} record {record!r} is not a dict of {sorted(RECORD_FIELDS)}")
        path, shape, dtype = record["path"], record["shape"], record["dtype"]
        if not isinstance(path, list) or not all(isinstance(k, str) or _is_int(k) for k in path):
            raise broken(f"{part} record {record!r}: path is not a list of str and int keys")
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise broken(f"{part} record {record!r}: shape is not a list of sizes (ints >= 0)")
        if not (isinstance(dtype, str) and _is_dtype_name(dtype)):
            raise broken(f"{part} record {record!r}: dtype is not a dtype's name")
        paths.append(tuple(path))
    inner = {p[:n] for p in paths for n in range(len(p))}
    clash = sorted(
        {p for p in paths if p in inner} | {p for p in paths if paths.count(p) > 1}, key=str
    )
    if clash:
        raise broken(f"{part} leaf paths {clash[:5]} repeat or lie inside another leaf's")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_dtype_name(name: str) -> bool:
    try:
        return jnp.dtype(name).name == name
    except (TypeError, ValueError):
        return False


def same_tree(taking: list[dict[str, Any]], part: str, directory: Any) -> list[dict[str, Any]]:
    """The leaf records every snapshot taking part shares; a clear error when they differ.

    Args:
      taking: the metadata of the snapshots taking part, by step.
      part: "params" or "batch_stats".
      directory: the snapshot folder, for messages.

    Returns:
      The latest snapshot's records of ``part``.

    Raises:
      ValueError: when two snapshots store different trees, naming the steps and paths.

    Example:
      >>> record = {"path": ["w"], "shape": [2], "dtype": "float32"}
      >>> same_tree([{"step": 1, "params": [record]}], "params", "snapshots")[0]["path"]
      ['w']
    """
    latest = taking[-1]
    part_records(latest, part, directory)
    for other in taking[:-1]:
        if other.get(part) != latest[part]:
            theirs = {_path_text(r): r for r in other.get(part) or []}
            ours = {_path_text(r): r for r in latest[part]}
            differ = sorted(p for p in theirs.keys() & ours.keys() if theirs[p] != ours[p])
            raise ValueError(
                f"snapshots of different trees in {os.fspath(directory)!r}: steps "
                f"{other['step']} and {latest['step']} differ in {part} (shapes/dtypes at "
                f"{differ[:5]}, only at {other['step']}: {sorted(theirs.keys() - ours.keys())[:5]}"
                f", only at {latest['step']}: {sorted(ours.keys() - theirs.keys())[:5]}); "
                "reconstruct from the snapshots of one run"
            )
    return latest[part]


def part_records(metadata: dict[str, Any], part: str, directory: Any) -> list[dict[str, Any]]:
    """The leaf records a snapshot's metadata holds for ``part``.

    Args:
      metadata: a snapshot's checked metadata.
      part: "params" or "batch_stats".
      directory: the snapshot folder, for messages.

    Returns:
      The records: each leaf's path, shape and dtype.

    Raises:
      ValueError: for another part, or batch statistics the snapshots do not hold.

    Example:
      >>> part_records({"params": []}, "params", "snapshots")
      []
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}; got {part!r}")
    if part not in metadata:
        raise ValueError(
            f"the snapshots in {os.fspath(directory)!r} hold no batch statistics: attach them "
            "with jema.attach_batch_stats before training to snapshot them"
        )
    records: list[dict[str, Any]] = metadata[part]
    return records


def leaf_records(tree: Any) -> list[dict[str, Any]]:
    """Each leaf's path (its keys, as JSON values), shape and dtype, in tree order.

    Args:
      tree: a pytree of arrays.

    Returns:
      One record per leaf.

    Example:
      >>> leaf_records({"w": [jnp.zeros(2)]})
      [{'path': ['w', 0], 'shape': [2], 'dtype': 'float32'}]
    """
    return [
        {"path": [_key(k) for k in path], "shape": list(leaf.shape), "dtype": str(leaf.dtype)}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _key(key: Any) -> str | int:
    for attribute in ("key", "idx", "name"):
        value = getattr(key, attribute, None)
        if isinstance(value, (str, int)):
            return value
    return str(key)


def _path_text(record: dict[str, Any]) -> str:
    return "/".join(map(str, record["path"]))


def leaf_name(i: int) -> str:
    """The name of the ``i``-th leaf in a stored tree's flat dict.

    Args:
      i: the leaf's index in tree order.

    Returns:
      ``leaf`` and six digits.

    Example:
      >>> leaf_name(7)
      'leaf000007'
    """
    return f"leaf{i:06d}"


def item_name(part: str, sigma_rel: float) -> str:
    """The orbax item holding one width's tree of ``part`` in a step folder.

    Args:
      part: "params" or "batch_stats".
      sigma_rel: the width.

    Returns:
      ``<part>-<width_key(sigma_rel)>``.

    Example:
      >>> item_name("params", 0.05)
      'params-0.05'
    """
    return f"{part}-{width_key(sigma_rel)}"


def check_path(directory: Any) -> str:
    """``directory`` as an absolute path.

    Args:
      directory: a str or os.PathLike.

    Returns:
      The absolute path.

    Raises:
      TypeError: for anything but a path.

    Example:
      >>> check_path("/tmp/snapshots")
      '/tmp/snapshots'
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path (str or os.PathLike); got {directory!r}")
    return os.path.abspath(os.fspath(directory))
