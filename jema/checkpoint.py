"""Saving and resuming training with its EMA (orbax), and exporting in SuperGradients' layout."""

from __future__ import annotations

import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jema import nnx as jema_nnx
from jema._checks import check_number
from jema._meshes import concrete_sharding
from jema._orbax import Directory, check_new_step, check_savable, open_manager, save_lock
from jema.train_state import TrainState

MEMORY_KINDS = "jema_memory_kinds"  # the step's custom metadata: leaf path -> memory kind


def save(directory: Directory, step: int, state: Any) -> None:
    """Save the whole train state, EMA and its count included, as checkpoint ``step``.

    Steps only go forward in a folder: orbax orders checkpoints by step, so a step below the
    latest one (e.g. after resuming from an earlier checkpoint) would be skipped or, saved,
    never be "the latest". Such a save is refused; delete the later steps or use a new folder.
    One process saves into a folder at a time (a lock file, ``.jema-save.lock``, held for the
    call; the processes of one multi-process run count as one).

    Args:
      directory: a folder (a manager is made and closed, so the save is finished on
        return) or your own ``ocp.CheckpointManager`` (its options and async saving apply).
      step: the checkpoint's number, a non-negative int above every saved step there.
      state: a linen :class:`jema.TrainState` (or any pytree), or nnx objects: a module, an
        ``nnx.Optimizer`` or a tuple of them, e.g. ``(model, optimizer)``.

    Raises:
      TypeError: when ``step`` is not an int.
      ValueError: when ``step`` is negative, already saved there, or below a saved step
        (nothing is written).
      NotADirectoryError: when ``directory`` is a file.
      BlockingIOError: when another process is saving into the same folder.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, jema
      >>> from jema.train_state import TrainState
      >>> state = TrainState.create(apply_fn=None, params={"w": jnp.ones(2)},
      ...                           tx=jema.with_ema(optax.sgd(0.1)))
      >>> save(tempfile.mkdtemp(), 0, state)
    """
    step = check_step(step)
    tree = _tree(state)
    check_savable(tree)
    kinds = {MEMORY_KINDS: _memory_kinds(tree)}
    with open_manager(directory) as manager, save_lock(os.fspath(manager.directory)):
        check_new_step(manager, step)
        manager.save(step, args=ocp.args.StandardSave(tree), custom_metadata=kinds, force=True)


def restore(directory: Directory, template: Any, *, step: int | None = None) -> Any:
    """Restore checkpoint ``step`` (default: the latest) into the structure of ``template``.

    Args:
      directory: a folder or an ``ocp.CheckpointManager``.
      template: a state built the same way as the saved one (same model, optimizer and
        attached batch statistics), e.g. a freshly created one; only its structure, shapes
        and dtypes are used (a Python number, e.g. ``state.replace(step=5)``, stands for
        the saved scalar at its place, whatever its dtype). nnx objects (a module, an
        optimizer or a tuple) are updated in place. Leaves go where the template puts them;
        on a mesh, those it leaves unplaced (counters) are replicated over it.
      step: the checkpoint to restore; None for the latest.

    Returns:
      The restored state (the updated nnx objects, for an nnx template).

    Raises:
      FileNotFoundError: when ``directory`` or the step does not exist (nothing is created).
      ValueError: when the template's shapes or dtypes differ from the saved ones (restoring
        would cast silently, e.g. a float32 EMA into a bfloat16 one), or a ``jax.eval_shape``
        template's sharding is on an abstract mesh outside ``with jax.set_mesh(mesh):``.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, jema
      >>> from jema.train_state import TrainState
      >>> state = TrainState.create(apply_fn=None, params={"w": jnp.ones(2)},
      ...                           tx=jema.with_ema(optax.sgd(0.1)))
      >>> folder = tempfile.mkdtemp()
      >>> save(folder, 3, state)
      >>> int(jema.ema_count(restore(folder, state).opt_state))
      0
    """
    if not isinstance(directory, ocp.CheckpointManager) and not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint folder {os.fspath(directory)!r}")
    with open_manager(directory) as manager:
        saved = sorted(manager.all_steps())
        if step is None and not saved:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        step = saved[-1] if step is None else check_step(step)
        if step not in saved:
            raise FileNotFoundError(
                f"no checkpoint step {step} in {manager.directory}; saved steps: {saved}"
            )
        metadata = manager.item_metadata(step)
        kinds = (manager.metadata(step).custom_metadata or {}).get(MEMORY_KINDS, {})
        abstract = _abstract(_tree(template), metadata, kinds)
        _check_like_saved(metadata, abstract)
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    if _is_nnx(template):
        nnx.update(template, restored)
        return template
    return restored


def export_pth(
    path: str | os.PathLike[str],
    student: TrainState | tuple[nnx.Module, nnx.Optimizer],
    *,
    teacher: Any = None,
    torch_template: Any = None,
    **extra: Any,
) -> None:
    """Write ``net`` and ``ema_net`` in SuperGradients' layout through ``interop.save_checkpoint``.

    Needs ``interop`` (imported here, never by ``import jema``); PyTorch only for an
    ``nn.Module`` as ``torch_template`` (a state_dict or a ``.pth``/``.safetensors`` file needs
    none).

    Args:
      path: the ``.pth`` (or ``.safetensors``) file to write.
      student: a linen :class:`jema.TrainState`, or ``(model, optimizer)`` for nnx.
      teacher: for knowledge distillation, the frozen teacher's variables (linen) or module
        (nnx); keys then get SG's KD prefixes ``student.`` and ``teacher.``, and ``ema_net``
        holds the same teacher.
      torch_template: the PyTorch module (or state_dict) giving names, order and buffers;
        for KD, one with ``.student`` and ``.teacher``.
      **extra: other checkpoint entries, e.g. ``epoch=3, acc=0.91``.

    Raises:
      TypeError: for a ``student`` of another kind.
      ValueError: as ``interop.save_checkpoint`` (mismatches against the template).

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax, jema
      >>> from jema.train_state import TrainState
      >>> state = TrainState.create(apply_fn=None, params={"fc": {"kernel": jnp.ones((2, 3))}},
      ...                           tx=jema.with_ema(optax.sgd(0.1)))
      >>> export_pth(os.path.join(tempfile.mkdtemp(), "ckpt.safetensors"), state, epoch=1)
    """
    import interop

    net, ema_net = _net_and_ema(student)
    if teacher is not None:
        net, ema_net = (
            {"student": net, "teacher": teacher},
            {"student": ema_net, "teacher": teacher},
        )
    interop.save_checkpoint(path, net=net, ema_net=ema_net, torch_template=torch_template, **extra)


def _net_and_ema(student: Any) -> tuple[Any, Any]:
    if isinstance(student, TrainState):
        net: Any = {"params": student.params}
        if student.batch_stats is not None:
            net["batch_stats"] = student.batch_stats
        return net, student.ema_variables()
    if isinstance(student, tuple) and len(student) == 2:
        model, optimizer = student
        if isinstance(model, nnx.Module) and isinstance(optimizer, nnx.Optimizer):
            net = _detached_weights(model)
            with jema_nnx.ema_weights(optimizer, model):
                ema_net = _detached_weights(model)
            return net, ema_net
    raise TypeError(
        f"student must be a jema TrainState or a (model, optimizer) pair of an nnx.Module and "
        f"an nnx.Optimizer; got {type(student).__name__}"
    )


def _detached_weights(model: nnx.Module) -> nnx.State:
    """The model's Param and BatchStat variables, as new Variables holding today's values."""
    return jax.tree.map(lambda x: x, nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))


def _is_nnx(state: Any) -> bool:
    nodes = state if isinstance(state, tuple) else (state,)
    return bool(nodes) and all(isinstance(node, nnx.Pytree) for node in nodes)


def _tree(state: Any) -> Any:
    return nnx.state(state) if _is_nnx(state) else state


def _check_like_saved(metadata: Any, abstract: Any) -> None:
    """Compare the template's leaves with the saved ones, by path (skipped without metadata)."""
    tree = getattr(metadata, "tree", None)
    if tree is None:
        return
    saved = _by_path(tree)
    wanted = _by_path(abstract)
    differ = sorted(
        f"{path}: saved {tuple(saved[path].shape)} {saved[path].dtype}, template "
        f"{tuple(w.shape)} {w.dtype}"
        for path, w in wanted.items()
        if path in saved
        and (tuple(saved[path].shape) != tuple(w.shape) or jnp.dtype(saved[path].dtype) != w.dtype)
    )
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    if differ or missing or unexpected:
        raise ValueError(
            "the template differs from the checkpoint (build it the same way as the saved state: "
            f"model, optimizer, ema_dtype, attached batch statistics): shapes/dtypes {differ}, "
            f"only in the template {missing[:10]}, only in the checkpoint {unexpected[:10]}"
        )


def _by_path(tree: Any) -> dict[str, Any]:
    """Leaves keyed by a path that reads the same for a state and for orbax's metadata tree."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _memory_kinds(tree: Any) -> dict[str, str]:
    """The memory kind of every leaf kept outside device memory (an EMA in host memory)."""
    return {
        path: leaf.sharding.memory_kind
        for path, leaf in _by_path(tree).items()
        if isinstance(leaf, jax.Array) and leaf.sharding.memory_kind not in (None, "device")
    }


def _abstract(tree: Any, metadata: Any, kinds: dict[str, str]) -> Any:
    """The template as shapes, dtypes and shardings to restore into.

    A number (Python or numpy) takes the saved leaf's dtype. A sharding on an abstract mesh
    (``jax.eval_shape``) goes on the concrete mesh ``jax.set_mesh`` holds. When the template
    spreads leaves over several devices, a leaf it left unplaced (an uncommitted array such as
    ``TrainState.create``'s step and optax's counts, a number, a struct without a sharding) is
    restored replicated over that mesh, as ``jit`` places it, not committed to one device. A leaf
    saved outside device memory (``kinds``, by path) goes back there unless the template keeps
    it in another memory itself; a ``jax.eval_shape`` template knows no memory kinds.
    """
    saved = _by_path(getattr(metadata, "tree", None) or {})

    unplaced: set[str] = set()

    def struct_of(path: Any, x: Any) -> jax.ShapeDtypeStruct:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        if isinstance(x, (numbers.Number, np.generic)):
            dtype = saved[key].dtype if key in saved else np.asarray(x).dtype
            return jax.ShapeDtypeStruct((), dtype)
        if not isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            raise TypeError(
                f"the template's leaf {key} is a {type(x).__name__}; a template holds arrays, "
                "jax.ShapeDtypeStructs or numbers (build it as the saved state was built)"
            )
        if isinstance(x, jax.Array) and not x.committed:
            unplaced.add(key)
        struct = ocp.utils.to_shape_dtype_struct(x)
        sharding = concrete_sharding(getattr(struct, "sharding", None), key, "restore")
        return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=sharding)

    structs = jax.tree_util.tree_map_with_path(struct_of, tree)
    meshes = [
        s.sharding.mesh
        for s in jax.tree.leaves(structs)
        if isinstance(s.sharding, NamedSharding) and len(s.sharding.device_set) > 1
    ]

    def leaf(path: Any, struct: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        sharding = struct.sharding
        if meshes and (sharding is None or key in unplaced):
            sharding = NamedSharding(meshes[0], PartitionSpec())
        if key in kinds and getattr(sharding, "memory_kind", None) in (None, "device"):
            if sharding is None and key in saved:
                sharding = saved[key].sharding.to_jax_sharding()
            if sharding is not None:
                sharding = sharding.with_memory_kind(kinds[key])
        return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf, structs)


def check_step(step: Any) -> int:
    """A checkpoint step: a non-negative int (numpy ints too; bools and floats are refused).

    Args:
      step: the step.

    Returns:
      ``step`` as a Python int.

    Raises:
      TypeError: when ``step`` is not an int.
      ValueError: when ``step`` is negative.

    Example:
      >>> check_step(3)
      3
    """
    rule = "be a non-negative int"
    return check_number(step, "step", rule, low=0, closed="low", kind="int", wrong_type=TypeError)
