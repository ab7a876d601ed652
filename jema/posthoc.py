"""Post-hoc EMA (Karras et al. 2023, EDM2): snapshots of the tracked power EMAs, and an EMA of
any width rebuilt from them after training.

Train with :func:`jema.power_ema` (e.g. widths 0.05 and 0.10), call :func:`save_snapshot` every
few thousand steps, and after training :func:`reconstruct` the EMA of any σ_rel at any snapshot
step: the least-squares fit of its averaging profile by the snapshots' profiles
(:func:`solve_weights`), applied to their weights one snapshot at a time.

A snapshot folder is an orbax checkpoint folder with one step folder per snapshot, named by
its step t (the EMA's count): per width, an item ``params-<σ_rel>`` (and ``batch_stats-<σ_rel>``
when the EMA averages BatchNorm statistics) holding the tree's leaves as a flat dict, and an
item ``metadata`` (JSON): the format, t, the widths, the storage dtype and every leaf's path,
shape and dtype. The metadata is checked field by field, and its t against the folder's name,
before anything is read. Folders that hold no snapshot item (an empty ``5``, another tool's
``99``, names that are not a step) are not the snapshots': listing, reconstructing and saving
leave them alone, and only a save at exactly their step is refused (they are in its way).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jema._checks import check_floating_dtype, check_number, is_floating
from jema._orbax import check_savable, open_manager, save_lock
from jema._power import check_sigma_rel, sigma_rel_to_gamma, width_key
from jema._snapshot_folder import (
    FORMAT,
    METADATA,
    STEP_NAME,
    STORAGE_DTYPES,
    check_new_snapshot_step,
    check_path,
    item_name,
    leaf_name,
    leaf_records,
    part_records,
    read_index,
    same_tree,
)
from jema._state import PowerEmaState, find_ema_state, tracked_sigma_rels

CHUNK_BYTES = 16 * 2**20  # stored trees are read in parts of about this size


class ExtrapolationWarning(UserWarning):
    """A reconstructed width is narrower than every tracked one: about 20x less accurate."""


@dataclass(frozen=True)
class Snapshot:
    """One saved snapshot, as :func:`list_snapshots` describes it.

    Attributes:
      step: t, the optimizer steps the EMAs had averaged (exact).
      sigma_rels: the tracked widths stored, sorted.
      dtype: the storage dtype of the floating leaves, or None for the EMA's own.
      batch_stats: whether the averaged BatchNorm statistics are stored too.
    """

    step: int
    sigma_rels: tuple[float, ...]
    dtype: str | None
    batch_stats: bool


def save_snapshot(
    directory: str | os.PathLike[str], opt_state: Any, *, dtype: Any = None
) -> Snapshot:
    """Store every tracked width of the power EMA in ``opt_state`` as the snapshot at its step.

    The step t is the EMA's count (:func:`jema.ema_count`); the snapshot holds the params'
    EMA of each width and, when :func:`jema.attach_batch_stats` was called, each width's
    averaged BatchNorm statistics (averaged as SuperGradients does; :func:`reconstruct` combines
    them like the weights). The save is atomic (orbax writes a temporary folder, then renames
    it) and works from every process of a multi-process run (all of them must call it). With
    ``every_k_steps=k``, save at multiples of k (the EMA was last averaged at a multiple).

    Args:
      directory: the snapshot folder (created when missing; holds nothing else).
      opt_state: an optimizer state holding a :func:`jema.power_ema` state.
      dtype: storage dtype of the floating leaves: "float16", "bfloat16" or "float32" (as
        a string or a dtype); None keeps the EMA's dtype.

    Returns:
      The snapshot's record.

    Raises:
      TypeError: when the EMA is SuperGradients' (no widths), or ``directory`` is not a path.
      ValueError: for another ``dtype``, a value the storage dtype cannot hold (float16 past
        65504 would become inf), an EMA that has averaged no step yet, a step already saved
        there or below a saved one, or a folder of another kind named by the step (nothing
        is written).
      NotADirectoryError: when ``directory`` is a file.
      BlockingIOError: when another process is saving into the same folder.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, jema
      >>> tx = optax.chain(optax.sgd(0.1), jema.power_ema((0.05, 0.1)))
      >>> params = {"w": jnp.ones(3)}
      >>> _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
      >>> save_snapshot(tempfile.mkdtemp(), state, dtype="float16")
      Snapshot(step=1, sigma_rels=(0.05, 0.1), dtype='float16', batch_stats=False)
    """
    storage = _check_storage_dtype(dtype)
    path = check_path(directory)
    state = find_ema_state(opt_state)
    if not isinstance(state, PowerEmaState):
        raise TypeError(
            "save_snapshot needs the power EMA of jema.power_ema(sigma_rels=...); this optimizer "
            "state holds SuperGradients' EMA (jema.ema_transform), which has no widths."
        )
    step = int(state.count)
    if step < 1:
        raise ValueError(
            "the EMA has averaged no optimizer step yet (ema_count is 0); save snapshots after "
            "training steps, e.g. every few thousand."
        )
    widths = tracked_sigma_rels(state)
    parts = {"params": state.emas}
    if state.batch_stats is not None:
        parts["batch_stats"] = state.batch_stats
    items: dict[str, Any] = {}
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "sigma_rels": list(widths),
        "dtype": storage,
    }
    check_savable(parts, "snapshot")
    for part, trees in parts.items():
        metadata[part] = leaf_records(trees[width_key(widths[0])])
        for width in widths:
            item = item_name(part, width)
            items[item] = ocp.args.PyTreeSave(_stored(trees[width_key(width)], storage, item))
    items[METADATA] = ocp.args.JsonSave(metadata)
    with open_manager(path, None) as manager, save_lock(os.fspath(manager.directory)):
        check_new_snapshot_step(manager, step)
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    return _record(metadata)


def list_snapshots(directory: str | os.PathLike[str]) -> list[Snapshot]:
    """The snapshots in ``directory``, by step.

    Args:
      directory: a folder :func:`save_snapshot` wrote.

    Returns:
      One :class:`Snapshot` per saved step, sorted by step (``[]`` for an empty folder).

    Raises:
      FileNotFoundError: when the folder does not exist (nothing is created).
      ValueError: naming the file or folder, when a snapshot's metadata is broken (a field
        of the wrong type or range, a repeated width, a missing item), is not a jema
        snapshot's, or names another step than its folder.

    Example:
      >>> import tempfile
      >>> list_snapshots(tempfile.mkdtemp())
      []
    """
    return [_record(metadata) for metadata in read_index(directory)]


def profile(tau: Any, step: int, sigma_rel: float) -> np.ndarray:
    """The averaging profile of the power EMA of width ``sigma_rel`` at ``step``.

    ``p(τ) = (γ + 1) / t · (τ / t)**γ`` on ``[0, t]``, 0 after t: the weight the EMA gives
    to the params of step τ (it integrates to 1).

    Args:
      tau: the steps to evaluate it at (array-like).
      step: t, a positive number.
      sigma_rel: the width, in [1e-38, 1/√12).

    Returns:
      ``p(τ)``, float64, shaped like ``tau``.

    Raises:
      ValueError: for a bad ``sigma_rel`` or a ``step`` that is not positive.

    Example:
      >>> profile([0.0, 50.0, 100.0, 150.0], 100, 0.2).round(5).tolist()
      [0.0, 0.00797, 0.02826, 0.0]
    """
    gamma = sigma_rel_to_gamma(sigma_rel)
    step = check_number(step, "step", "be a positive number", low=0.0)
    tau = np.asarray(tau, np.float64)
    inside = (tau >= 0) & (tau <= step)
    return np.where(inside, (gamma + 1) / step * np.clip(tau / step, 0, 1) ** gamma, 0.0)


def solve_weights(
    snapshot_steps: Sequence[int],
    snapshot_sigma_rels: Sequence[float],
    target_step: int,
    target_sigma_rels: float | Sequence[float],
) -> np.ndarray:
    """Weights of the snapshots whose sum best approximates the EMA of each target width.

    The least-squares fit (L2 over τ) of the target's profile by the snapshots' profiles
    (:func:`profile`), from the normal equations with their closed-form inner products,
    solved in float64; each column is then divided by its sum, so a constant trajectory is
    reproduced exactly. Only snapshots with ``t <= target_step`` take part; the others get 0.
    A target equal to a snapshot (same t and width) gets that snapshot alone.

    Args:
      snapshot_steps: each snapshot's t, positive whole numbers: ints or integral floats
        (EDM2 keeps float steps), in any sequence or array.
      snapshot_sigma_rels: each snapshot's width, same length.
      target_step: t of the targets, a positive whole number (0-d arrays too).
      target_sigma_rels: the widths to reconstruct (one number, 0-d array or sequence).

    Returns:
      float64 array ``(n_snapshots, n_targets)``; each column sums to 1.

    Raises:
      ValueError: for lengths that differ, no snapshot or target, a step that is not a
        positive whole number, a width outside [1e-38, 1/√12), no snapshot at or before
        ``target_step``, or a target whose profile the snapshots do not reach (all far
        earlier).

    Example:
      >>> solve_weights([100, 100, 200, 200], [0.05, 0.1] * 2, 200, 0.1).round(6).ravel()
      array([0., 0., 0., 1.])
    """
    steps = [_check_positive_int(t, "snapshot_steps") for t in _sequence(snapshot_steps)]
    widths = [
        check_sigma_rel(s, f"snapshot_sigma_rels[{n}]")
        for n, s in enumerate(_sequence(snapshot_sigma_rels))
    ]
    targets = [
        check_sigma_rel(s, f"target_sigma_rels[{n}]")
        for n, s in enumerate(_sequence(target_sigma_rels))
    ]
    target_step = _check_positive_int(target_step, "target_step")
    if len(steps) != len(widths) or not steps:
        raise ValueError(
            "snapshot_steps and snapshot_sigma_rels must be non-empty and of one length; got "
            f"{len(steps)} steps and {len(widths)} widths"
        )
    if not targets:
        raise ValueError("target_sigma_rels must name at least one width; got none")
    used = np.flatnonzero(np.array(steps) <= target_step)
    if not used.size:
        raise ValueError(
            f"no snapshot at or before target_step {target_step}; the earliest is {min(steps)}"
        )
    t = np.array(steps, np.float64)[used]
    g = np.array([sigma_rel_to_gamma(s) for s in widths])[used]
    g_target = np.array([sigma_rel_to_gamma(s) for s in targets])
    gram = _inner(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = _inner(t[:, None], g[:, None], float(target_step), g_target[None, :])
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    sums = x.sum(axis=0)
    lost = [
        s for s, total in zip(targets, sums, strict=True) if not np.isfinite(total) or not total
    ]
    if lost:
        raise ValueError(
            f"the snapshots up to target_step {target_step} do not reach the profile of "
            f"sigma_rel {lost} (they end too early for so narrow a width); save snapshots "
            "closer to target_step"
        )
    x /= sums
    for j, target in enumerate(targets):
        same = [i for i, k in enumerate(used) if (steps[k], widths[k]) == (target_step, target)]
        if same:
            x[:, j] = np.eye(len(used))[same[0]]
    weights = np.zeros((len(steps), len(targets)))
    weights[used] = x
    return weights


def reconstruct(
    directory: str | os.PathLike[str],
    sigma_rel: float | Sequence[float],
    *,
    step: int | None = None,
    dtype: Any = None,
    part: str = "params",
    progress: bool = False,
) -> Any:
    """The EMA of width ``sigma_rel`` at ``step``, rebuilt from the snapshots in ``directory``.

    Streams: one width of one snapshot is in memory at a time, plus a float32 accumulator per
    target. Widths narrower than every tracked one are extrapolated, about 20x less accurately
    (an :class:`ExtrapolationWarning` says so).

    Args:
      directory: a folder :func:`save_snapshot` wrote.
      sigma_rel: the width to rebuild, in [1e-38, 1/√12), or a sequence of widths.
      step: the t to rebuild at (the snapshots up to it take part); None for the latest.
      dtype: dtype of the returned floating leaves; None for the EMA's own.
      part: "params" (the weights' EMA) or "batch_stats" (the averaged statistics).
      progress: show a tqdm progress bar over the snapshots (when tqdm is installed).

    Returns:
      The tree as nested dicts keyed by the params' tree paths (a linen params dict comes
      back as the same dict; masked ``None`` leaves are left out) of numpy arrays in host
      memory; a list of them for a sequence of widths.

    Raises:
      FileNotFoundError: when the folder does not exist or holds no snapshot.
      ValueError: for a bad width, step, dtype or part, no snapshot at or before ``step``,
        snapshots of different trees, or ``part="batch_stats"`` where none were stored.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, jema
      >>> tx, folder = jema.power_ema((0.05, 0.1)), tempfile.mkdtemp()
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> for t in range(1, 5):
      ...     _, state = tx.update(params, state, params)  # the weights are 2.0 throughout
      ...     _ = save_snapshot(folder, state)
      >>> reconstruct(folder, 0.07)["w"].tolist()
      [2.0, 2.0]
    """
    single = not isinstance(sigma_rel, Iterable) or np.ndim(sigma_rel) == 0
    targets = [check_sigma_rel(s) for s in _sequence(sigma_rel)]
    out_dtype = _check_dtype(dtype)
    part_records({"params": [], "batch_stats": []}, part, directory)
    index = read_index(directory)
    if not index:
        path = check_path(directory)
        others = sorted(name for name in os.listdir(path) if STEP_NAME.fullmatch(name))
        raise FileNotFoundError(
            f"no snapshot in {path!r}"
            + (f" (its step folders {others[:5]} hold no jema snapshot)" if others else "")
        )
    target_step = index[-1]["step"] if step is None else _check_positive_int(step, "step")
    saved = [m["step"] for m in index]
    if target_step not in saved:  # the profile at a step between snapshots is not known
        raise ValueError(f"no snapshot at step {target_step}; saved steps: {saved}")
    taking = [m for m in index if m["step"] <= target_step]
    records = same_tree(taking, part, directory)
    narrowest = min(min(m["sigma_rels"]) for m in taking)
    for target in (s for s in targets if s < narrowest):
        warnings.warn(
            f"sigma_rel={target!r} is narrower than every tracked width (narrowest "
            f"{narrowest!r}): it is extrapolated, about 20x less accurately; track a narrower "
            "width to reconstruct it well.",
            ExtrapolationWarning,
            stacklevel=2,
        )
    rows = [(m["step"], s) for m in taking for s in m["sigma_rels"]]
    weights = solve_weights([t for t, _ in rows], [s for _, s in rows], target_step, targets)
    used = [(row, w) for row, w in zip(rows, weights, strict=True) if w.any()]
    sums = [[np.zeros(r["shape"], np.float32) for r in records] for _ in targets]
    kept: list[Any] = [None] * len(records)
    with open_manager(check_path(directory), None) as manager:
        for (t, width), w in _progress(used, progress, len(used)):
            for i, leaf in _stored_leaves(manager, t, item_name(part, width), records):
                if not is_floating(leaf.dtype):
                    kept[i] = leaf
                    continue
                for total, weight in zip(sums, w, strict=True):
                    total[i] += np.multiply(leaf, np.float32(weight), dtype=np.float32)
    trees = [
        _nest(
            records, [_cast(x, k, r, out_dtype) for x, k, r in zip(s, kept, records, strict=True)]
        )
        for s in sums
    ]
    return trees[0] if single else trees


def load_snapshot(
    directory: str | os.PathLike[str], step: int, sigma_rel: float, *, part: str = "params"
) -> Any:
    """One tracked width of one snapshot, as stored (in its storage dtype).

    Args:
      directory: a folder :func:`save_snapshot` wrote.
      step: the snapshot's step (a positive whole number).
      sigma_rel: one of the widths it holds.
      part: "params" or "batch_stats".

    Returns:
      The tree, as :func:`reconstruct` returns it.

    Raises:
      FileNotFoundError: when the folder or the step does not exist.
      ValueError: for a width the snapshot does not hold (listing those it does), a step
        that is not a positive whole number, a bad ``part``, or broken metadata (as
        :func:`list_snapshots`).

    Example:
      >>> import tempfile, jax.numpy as jnp, jema
      >>> tx, folder = jema.power_ema((0.1,)), tempfile.mkdtemp()
      >>> _, state = tx.update({"w": jnp.zeros(2)}, tx.init({"w": jnp.ones(2)}), {"w": jnp.ones(2)})
      >>> _ = save_snapshot(folder, state, dtype="bfloat16")
      >>> load_snapshot(folder, 1, 0.1)["w"].dtype
      dtype(bfloat16)
    """
    step = _check_positive_int(step, "step")
    (metadata,) = read_index(directory, [step])
    records = part_records(metadata, part, directory)
    if check_sigma_rel(sigma_rel) not in metadata["sigma_rels"]:
        raise ValueError(
            f"snapshot {step} holds sigma_rel {metadata['sigma_rels']}; got {sigma_rel!r} "
            "(use reconstruct for another width)"
        )
    leaves: list[Any] = [None] * len(records)
    with open_manager(check_path(directory), None) as manager:
        for i, leaf in _stored_leaves(manager, step, item_name(part, sigma_rel), records):
            leaves[i] = leaf
    return _nest(records, leaves)


def _inner(t_a: Any, g_a: Any, t_b: Any, g_b: Any) -> np.ndarray:
    """``<p_a, p_b>`` of two power profiles: the one home of the closed form (float64)."""
    t_hi, t_lo = np.maximum(t_a, t_b), np.minimum(t_a, t_b)
    g_hi = np.where(t_a >= t_b, g_a, g_b)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def _record(metadata: dict[str, Any]) -> Snapshot:
    return Snapshot(
        step=metadata["step"],
        sigma_rels=tuple(sorted(metadata["sigma_rels"])),
        dtype=metadata["dtype"],
        batch_stats="batch_stats" in metadata,
    )


def _stored(tree: Any, storage: str | None, item: str) -> dict[str, Any]:
    """The leaves as orbax's flat dict, floating ones in the storage dtype.

    Raises:
      ValueError: naming the item and leaf, when a finite value would become inf in the
        storage dtype (float16 ends at 65504).
    """
    flat = {}
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        if storage is not None and is_floating(leaf.dtype):
            cast = leaf.astype(storage)
            if bool(jnp.any(jnp.isinf(cast) & jnp.isfinite(leaf))):
                largest = float(jnp.max(jnp.where(jnp.isfinite(leaf), jnp.abs(leaf), 0)))
                raise ValueError(
                    f"{item}{jax.tree_util.keystr(path)} holds values up to {largest:g}, past "
                    f"{storage}'s largest {float(jnp.finfo(storage).max):g}: stored as {storage} "
                    "they would become inf. Save with dtype='bfloat16' (float32's range) or "
                    "'float32'; nothing was written."
                )
            leaf = cast
        flat[leaf_name(i)] = leaf
    return flat


def _stored_leaves(
    manager: ocp.CheckpointManager, step: int, item: str, records: list[dict[str, Any]]
) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, leaf)`` of one stored tree as numpy arrays, read ``CHUNK_BYTES`` at a time
    (so a large tree never sits in memory twice: reading it whole costs about 2x its size)."""
    group: list[int] = []
    size = 0
    for i, record in enumerate(records):
        group.append(i)
        size += 4 * math.prod(record["shape"])
        if size >= CHUNK_BYTES or i == len(records) - 1:
            names = [leaf_name(k) for k in group]
            restore = ocp.args.PyTreeRestore(
                item=dict.fromkeys(names, 0),
                restore_args={n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names},
                partial_restore=True,
            )
            flat = manager.restore(step, args=ocp.args.Composite(**{item: restore}))[item]
            yield from zip(group, (flat.pop(n) for n in names), strict=True)
            group, size = [], 0


def _cast(total: np.ndarray, kept: Any, record: dict[str, Any], dtype: Any) -> np.ndarray:
    """The accumulated leaf in the wanted dtype (a stored non-floating leaf as it was)."""
    if kept is not None:
        return kept
    wanted = np.dtype(record["dtype"] if dtype is None else dtype)
    return total if wanted == total.dtype else total.astype(wanted)


def _nest(records: list[dict[str, Any]], leaves: list[Any]) -> Any:
    """Nested dicts keyed by each leaf's path (a leaf at the empty path is returned alone)."""
    if len(records) == 1 and not records[0]["path"]:
        return leaves[0]
    tree: dict[Any, Any] = {}
    for record, leaf in zip(records, leaves, strict=True):
        *parents, last = record["path"]
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def _progress(items: list[Any], enabled: bool, total: int) -> Iterable[Any]:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, total=total, desc="snapshots", unit="snapshot", leave=False)


def _sequence(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or np.ndim(value) == 0:
        return [value]
    return list(value) if isinstance(value, Iterable) else [value]


def _check_positive_int(value: Any, name: str) -> int:
    """A step: a positive whole number (ints, exactly; integral floats such as EDM2's float
    step arrays hold; 0-d numpy and jax arrays)."""
    rule = "hold positive ints (optimizer steps)"
    return check_number(value, name, rule, low=1, closed="low", kind="whole")


def _check_storage_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = ""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be None or one of {STORAGE_DTYPES}; got {dtype!r}")
    return name


def _check_dtype(dtype: Any) -> np.dtype | None:
    return None if dtype is None else check_floating_dtype(dtype, "dtype", "'float32'")
