"""The pure conversions: a PyTorch state_dict <-> Flax variables, through numpy.

Only ``flax_to_torch`` needs PyTorch: numpy arrays are the hub, so a state_dict of numpy arrays
(read from a ``.pth`` or safetensors file without PyTorch) converts as one of tensors does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack, overload

import numpy as np

from interop._dtypes import as_numpy, is_array, numpy_dtype, to_torch
from interop._layouts import (
    LEAVES,
    FeatureMaps,
    feature_maps,
    reorder_inputs,
    rule,
    torch_shapes,
)
from interop._leftovers import conflicts, sort_leftovers
from interop._match import Pairing, Unit, pair, units
from interop._names import Rename, match_key, usable_names
from interop._report import Converted, Problems, few
from interop._sharded import to_jax
from interop._torch import is_module, require
from interop._tree import Flat, flatten
from interop._types import StateDict, TorchTemplate, Variables

if TYPE_CHECKING:
    import torch


class Options(TypedDict, total=False):
    """The pairing and casting options every conversion takes (for the overloads' types)."""

    rename: Rename | None
    match_by_order: bool
    cast: bool
    flattened: FeatureMaps | None


@overload
def torch_to_flax(
    state_dict: StateDict, template: Variables, *, prefix: str | None = ...,
    strict: Literal[True] = ..., **options: Unpack[Options],
) -> Any: ...  # fmt: skip
@overload
def torch_to_flax(
    state_dict: StateDict, template: Variables, *, prefix: str | None = ...,
    strict: Literal[False], **options: Unpack[Options],
) -> Converted: ...  # fmt: skip
@overload
def torch_to_flax(
    state_dict: StateDict, template: Variables, *, prefix: str | None = ...,
    strict: bool, **options: Unpack[Options],
) -> Any: ...  # fmt: skip


def torch_to_flax(
    state_dict: StateDict,
    template: Variables,
    *,
    prefix: str | None = None,
    rename: Rename | None = None,
    match_by_order: bool = False,
    strict: bool = True,
    cast: bool = False,
    flattened: FeatureMaps | None = None,
) -> Any:
    """Fills a Flax template from a PyTorch state_dict; the inputs are left untouched.

    Each Flax leaf is looked for under its default PyTorch name: the module path joined by dots
    (linen ``layers_0`` and nnx index ``0`` both give ``layers.0``), then the leaf's own name
    as it is (``gamma_1``), ``kernel``/``scale``/``embedding`` as ``weight`` and ``mean``/
    ``var`` as ``running_mean``/``running_var``; weight norm's ``weight_g``/``weight_v`` and
    ``parametrizations.weight.original0``/``original1`` find each other. An
    ``nnx.Sequential`` keeps its children in a list ``layers`` that PyTorch's ``nn.Sequential``
    does not have; in an nnx Module template that part is left out, so ``self.layers =
    nnx.Sequential(...)`` gives ``layers.0.weight`` as ``self.layers = nn.Sequential(...)`` does.
    Where module types are unknown (linen variables, nnx State), a name not found as is, e.g.
    ``layers.layers.0.weight`` from a linen ``self.layers = nn.Sequential([...])`` in
    ``setup``, is tried without each ``layers`` part followed by an index (``layers.0.weight``).
    A linen ``nn.Sequential([...], name="layers")`` built inside ``@nn.compact`` registers its
    layers on the parent as ``Dense_0``, ``BatchNorm_0``, ``Dense_1`` (each type numbered on its
    own, no ``layers`` part): name them as PyTorch does, ``nn.Dense(8, name="layers_0")``, or
    pass one rename rule per layer, e.g. ``{r"^layers\\.0\\.": "Dense.0."}``.

    A key no leaf takes is no mismatch when it is tied to a key that was taken (the same
    tensor, or equal values where a file lost the sharing: a GPT-2 ``lm_head.weight``) or is a
    tensor only PyTorch stores (``num_batches_tracked``, integer index tables and masks,
    sinusoidal position tables); the report notes both.

    A template leaf whose sharding spans several devices (``jax.ShapeDtypeStruct(shape, dtype,
    sharding=NamedSharding(mesh, spec))``, a sharded ``jax.Array``, an nnx abstract state from
    ``nnx.get_abstract_model``; an abstract mesh is resolved by ``jax.set_mesh``) is filled with
    a ``jax.Array`` of exactly that sharding, built shard by shard: each process copies from the
    source, through the layout's transpose, only the blocks its addressable devices hold, one
    copy per distinct block (a replicated leaf is read once per process). From a file's memory
    map (``read_checkpoint``: safetensors, a ``.pth`` of either format) the pages each copied
    chunk touched are let go, so a process's memory grows by its shards, not by the file; deflated
    ``.pth`` records and big-endian files are whole copies in memory already. A ``flattened``
    kernel is reordered whole (one tensor at a time) before it is split. In multi-process jobs
    every process calls this with the same template. Leaves without a sharding, or on one device,
    are loaded whole onto the default device.

    Args:
      state_dict: PyTorch names -> tensors, or numpy arrays (e.g. read from a safetensors file
        without PyTorch); a ``module.`` prefix on every key is dropped.
      template: linen variables (arrays or ``jax.ShapeDtypeStruct``), an nnx model or state, or
        a mapping of names to those (each name a key prefix, e.g. ``student``).
      prefix: keep only keys starting with it (e.g. ``"teacher."``), without it.
      rename: ``{regex: replacement}`` rules turning PyTorch names into the Flax side's default
        names, tried after exact (normalised) names.
      match_by_order: pair what is left in order, shapes checked. Only for linen variables
        straight from an eager ``init``: ``jax.eval_shape`` and ``jit`` sort dict keys. A
        template whose every dict level is in sorted order, paired with PyTorch keys that are
        not (registration order: ``weight`` before ``bias``), is refused when a pair made by
        order has the wrong shape; an eager template that happens to be sorted (no module with
        both ``kernel`` and ``bias``) pairs as usual while its shapes agree.
      strict: raise on any mismatch; else return ``Converted(value, report)``, leaves that were
        not filled keeping the template's value.
      cast: convert dtypes that differ from the template's instead of reporting them.
      flattened: ``{"fc": (C, H, W)}`` for a Linear that takes an ``nn.Flatten`` of a conv map
        (PyTorch flattens NCHW as C, H, W) whose Flax twin flattens NHWC (``x.reshape(n,
        -1)``: H, W, C): its kernel's rows are reordered to match. Keys are PyTorch names as
        ``rename`` sees them (without ``module.`` or ``prefix``), values the map's shape in
        PyTorch's order (``(C, L)`` and ``(C, D, H, W)`` too).

    Returns:
      The template's structure (linen: dicts; nnx: an ``nnx.State`` for ``nnx.update``) holding
      jax arrays (with the template leaf's sharding where it has one), or numpy arrays for
      dtypes JAX cannot hold as is (float64 with x64 off).

    Raises:
      ValueError: listing every missing, unexpected, mis-shaped or mis-typed key (strict);
        for ``match_by_order`` with a sorted template as above, naming a pair; for a
        ``flattened`` key that names no Linear weight, or a shape of the wrong size; naming
        the leaf whose sharding cannot hold it (a spec that does not divide its shape, an
        abstract mesh no ``jax.set_mesh`` makes concrete, float64 with x64 off).
      TypeError: for a template, state_dict or ``flattened`` of the wrong kind.

    Example:
      >>> import jax.numpy as jnp
      >>> sd = {"fc.weight": np.ones((3, 2), np.float32), "fc.bias": np.zeros(3, np.float32)}
      >>> tmpl = {"params": {"fc": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}}
      >>> torch_to_flax(sd, tmpl)["params"]["fc"]["kernel"].shape
      (2, 3)
    """
    flat = flatten(template)
    _check_order(match_by_order, flat.ordered)
    names = _usable(state_dict, prefix)
    pairing = pair(flat.leaves, names, rename, match_by_order)
    _refuse_sorted(flat, pairing, state_dict, "template")
    inputs = _feature_maps(flattened, names, state_dict, "the state_dict")
    problems = Problems()
    sort_leftovers(pairing, state_dict, frozenset(), problems, problems.unexpected)
    values = [leaf.value for leaf in flat.leaves]
    index = {id(leaf): i for i, leaf in enumerate(flat.leaves)}
    for unit, needs in pairing.lacking:
        problems.missing += [f"{leaf.label} (needs {needs})" for leaf in unit.leaves]
    for unit, keys in pairing.found:
        arrays = _unit_to_flax(unit, [state_dict[k] for k in keys], keys, problems, cast, inputs)
        for leaf, array in zip(unit.leaves, arrays or (), strict=False):
            values[index[id(leaf)]] = array
    return problems.finish(flat.rebuild(values), strict, "the state_dict")


@overload
def flax_to_torch(
    variables: Variables, torch_template: TorchTemplate | None = ..., *,
    strict: Literal[True] = ..., **options: Unpack[Options],
) -> OrderedDict[str, torch.Tensor]: ...  # fmt: skip
@overload
def flax_to_torch(
    variables: Variables, torch_template: TorchTemplate | None = ..., *,
    strict: Literal[False], **options: Unpack[Options],
) -> Converted: ...  # fmt: skip
@overload
def flax_to_torch(
    variables: Variables, torch_template: TorchTemplate | None = ..., *,
    strict: bool, **options: Unpack[Options],
) -> OrderedDict[str, torch.Tensor] | Converted: ...  # fmt: skip


def flax_to_torch(
    variables: Variables,
    torch_template: TorchTemplate | None = None,
    *,
    rename: Rename | None = None,
    match_by_order: bool = False,
    strict: bool = True,
    cast: bool = False,
    flattened: FeatureMaps | None = None,
) -> Any:
    """Turns Flax variables into a PyTorch state_dict; the inputs are left untouched.

    Without a template, names follow the default (see ``torch_to_flax``): module path joined by
    dots, linen ``layers_0`` and nnx index ``0`` both become ``layers.0``, the ``layers`` list of
    an ``nnx.Sequential`` in an nnx Module left out; ``kernel``/``scale``/``embedding``
    become ``weight``, ``mean``/``var`` become ``running_mean``/``running_var``, and each
    BatchNorm gets ``num_batches_tracked = 0``. With a template, the result has exactly its keys,
    order and dtypes: tied keys (a GPT-2 ``lm_head.weight``) hold their source's new tensor, and
    tensors only PyTorch stores (``num_batches_tracked``, a module's buffers, sinusoidal
    position tables) the template's values, so a strict ``load_state_dict`` gives the converted
    model. Tied keys that would get different values are a mismatch (``conflicts``).

    Args:
      variables: linen variables, an nnx model or state, or a mapping of names to those
        (``{"student": ..., "teacher": ...}`` gives ``student.*`` and ``teacher.*`` keys).
      torch_template: an ``nn.Module`` or its state_dict (tensors or numpy arrays).
      rename: ``{regex: replacement}`` rules turning template names into default names (with a
        template only).
      match_by_order: pair what is left in order (linen variables in an eager ``init``'s
        order, not ``jit`` output, whose keys are sorted: see ``torch_to_flax``; with a
        template only).
      strict: raise on any mismatch; else return ``Converted(state_dict, report)``, template
        keys that were not filled keeping the template's values.
      cast: convert to the template's dtypes instead of reporting differences.
      flattened: ``{"fc": (C, H, W)}``, as in ``torch_to_flax``: the Dense kernel's rows go
        back to PyTorch's C, H, W order. Keys are template names, or default names without a
        template.

    Returns:
      An ``OrderedDict`` of PyTorch names -> new contiguous tensors (or ``Converted`` when not
      strict).

    Raises:
      ValueError: listing every missing, unexpected, mis-shaped, mis-typed or conflicting key
        (strict); naming ``rename`` or ``match_by_order`` when given without a template; naming
        two leaves whose default names load back as one (no template); for ``match_by_order``
        with sorted variables or a bad ``flattened``, as in ``torch_to_flax``.
      TypeError: for inputs of the wrong kind.
      ImportError: when PyTorch is not installed.

    Example:
      >>> import jax.numpy as jnp
      >>> variables = {"params": {"layers_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}}
      >>> {k: tuple(v.shape) for k, v in flax_to_torch(variables).items()}
      {'layers.0.weight': (3, 2), 'layers.0.bias': (3,)}
    """
    require("flax_to_torch")
    options: Options = {
        "rename": rename,
        "match_by_order": match_by_order,
        "cast": cast,
        "flattened": flattened,
    }
    out = state_dict(variables, torch_template, strict, options)
    if isinstance(out, Converted):
        return Converted(tensors(out.value), out.report)
    return tensors(out)


def tensors(arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    """A state_dict of numpy arrays as tensors, one tensor per array: keys that hold one array
    (tied keys) hold one tensor, as in a module's state_dict.

    Args:
      arrays: names -> numpy arrays.

    Returns:
      Names -> tensors, in the same order.

    Raises:
      ImportError: when PyTorch is not installed.

    Example:
      >>> w = np.ones((2, 2), np.float32)
      >>> out = tensors({"embed.weight": w, "head.weight": w})
      >>> out["embed.weight"] is out["head.weight"]
      True
    """
    made: dict[int, torch.Tensor] = {}
    for array in arrays.values():
        if id(array) not in made:
            made[id(array)] = to_torch(array)
    return OrderedDict((key, made[id(array)]) for key, array in arrays.items())


def state_dict(
    variables: Variables,
    torch_template: TorchTemplate | None = None,
    strict: bool = True,
    options: Options | None = None,
) -> Any:
    """``flax_to_torch`` with numpy arrays for tensors, so it runs without PyTorch.

    Args:
      variables, torch_template, strict: as in ``flax_to_torch``.
      options: ``rename``, ``match_by_order``, ``cast`` and ``flattened``, as in
        ``flax_to_torch``.

    Returns:
      An ``OrderedDict`` of PyTorch names -> numpy arrays in PyTorch's layout (or ``Converted``
      when not strict). They may be read-only views of the variables' (or template's) memory,
      e.g. a transposed view for a kernel: copy one before writing to it.

    Raises:
      ValueError: as ``flax_to_torch``.
      TypeError: as ``flax_to_torch``.

    Example:
      >>> variables = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32)}}}
      >>> {k: v.shape for k, v in state_dict(variables).items()}
      {'fc.weight': (3, 2)}
    """
    rename = (options or {}).get("rename")
    match_by_order = (options or {}).get("match_by_order", False)
    cast = (options or {}).get("cast", False)
    flattened = (options or {}).get("flattened")
    flat = flatten(variables)
    if torch_template is None:
        _refuse_without_template(rename, match_by_order)
        return Problems().finish(_default_state_dict(flat, flattened), strict, "")
    _check_order(match_by_order, flat.ordered)
    template, buffers = _template_state_dict(torch_template)
    names = _usable(template)
    pairing = pair(flat.leaves, names, rename, match_by_order)
    _refuse_sorted(flat, pairing, template, "variables")
    inputs = _feature_maps(flattened, names, template, "the torch_template")
    problems = Problems()
    tied = sort_leftovers(pairing, template, buffers, problems, problems.missing)
    problems.unexpected += [leaf.label for unit, _ in pairing.lacking for leaf in unit.leaves]
    produced: dict[str, np.ndarray] = {}
    for unit, keys in pairing.found:
        arrays = unit.layout.to_torch([np.asarray(leaf.value) for leaf in unit.leaves])
        for key, array in zip(keys, arrays, strict=True):
            converted = _to_template(array, key, template[key], problems, cast, unit)
            if converted is not None:
                produced[key] = _reordered(unit, key, converted, inputs, to_flax=False)
    produced.update((alias, produced[s]) for alias, s in tied.items() if s in produced)
    problems.conflicts += conflicts(produced, template)
    out = OrderedDict(
        (key, produced[key] if key in produced else as_numpy(value))
        for key, value in template.items()
    )
    return problems.finish(out, strict, "the Flax variables")


def _check_order(match_by_order: bool, ordered: bool) -> None:
    if match_by_order and not ordered:
        raise ValueError(
            "match_by_order=True needs linen variables: nnx state is sorted by name, not in "
            "PyTorch's registration order. Use rename={pattern: replacement} instead."
        )


_EAGER = {  # what to pass instead of sorted linen dicts, by the side they are on
    "template": "Pass an eager template, model.init(key, x) (any values of the right shapes)",
    "variables": (
        "Put them in an eager init's order: with flatten_dict and unflatten_dict from "
        "flax.traverse_util and flat = flatten_dict(variables), pass "
        "unflatten_dict({path: flat[path] for path in flatten_dict(model.init(key, x))})"
    ),
}


def _refuse_sorted(
    flat: Flat, pairing: Pairing, torch_side: StateDict, side: Literal["template", "variables"]
) -> None:
    """Refuses pairs made by order when ``flat`` is sorted (``jax.eval_shape``, ``jit``), the
    keys paired by order are not, and one such pair has the wrong shape."""
    by_order = pairing.by_order
    if not flat.sorted or list(by_order) == sorted(by_order, key=lambda k: k.split(".")):
        return
    chosen = set(by_order)
    for unit, keys in pairing.found:
        shapes = [tuple(leaf.value.shape) for leaf in unit.leaves]
        for key, want in zip(keys, torch_shapes(unit.layout, shapes), strict=True):
            if key in chosen and tuple(torch_side[key].shape) != want:
                raise ValueError(
                    f"match_by_order=True paired {key} {tuple(torch_side[key].shape)} with "
                    f"{unit.leaves[0].label} {shapes[0]}: the dict keys of the {side} are in "
                    "sorted order at every level, as jax.eval_shape and jax.jit return them, "
                    "not in the order the model first calls its modules, which is PyTorch's "
                    f"order. {_EAGER[side]}; or pair by name with rename={{pattern: "
                    "replacement}"
                )


def _refuse_without_template(rename: Rename | None, match_by_order: bool) -> None:
    ignored = [
        name
        for name, given in (("rename", rename is not None), ("match_by_order", match_by_order))
        if given
    ]
    if ignored:
        raise ValueError(
            f"flax_to_torch got {' and '.join(ignored)} without a torch_template: they pair "
            "template names with Flax's default names, and without a template the default "
            "names are written as they are. Pass torch_template=your_module (or its "
            f"state_dict), or drop {' and '.join(ignored)}"
        )


def _usable(state_dict: StateDict, prefix: str | None = None) -> dict[str, str]:
    """Checks that ``state_dict`` maps names to arrays; its usable names -> its keys."""
    if not isinstance(state_dict, Mapping):
        hint = "; pass its .state_dict()" if is_module(state_dict) else ""
        raise TypeError(
            f"expected a state_dict (a mapping of names to tensors or arrays), got a "
            f"{type(state_dict).__name__}{hint}"
        )
    bad = sorted(str(k) for k, v in state_dict.items() if not is_array(v))
    if bad:
        whole = {"net", "ema_net"} & set(bad)
        hint = f"; a whole checkpoint? pass checkpoint[{min(whole)!r}]" if whole else ""
        raise TypeError(
            f"state_dict values must be tensors or arrays; {len(bad)} keys hold other values: "
            f"{few([repr(n) for n in bad], most=5)}{hint}"
        )
    return usable_names(state_dict, prefix)


def _feature_maps(
    flattened: FeatureMaps | None, names: Mapping[str, str], side: StateDict, where: str
) -> dict[str, tuple[int, ...]]:
    """``feature_maps`` by usable names (``names``: usable -> key), returned by key."""
    if flattened is None:
        return {}
    shapes = {name: tuple(side[key].shape) for name, key in names.items()}
    return {names[name]: shape for name, shape in feature_maps(flattened, shapes, where).items()}


def _reordered(
    unit: Unit, key: str, weight: np.ndarray, inputs: Mapping[str, tuple[int, ...]], to_flax: bool
) -> np.ndarray:
    """``weight`` of ``key`` (PyTorch's layout) with its inputs reordered if ``flattened``
    names it."""
    if key not in inputs:
        return weight
    if unit.layout is not LEAVES["kernel"]:
        raise ValueError(
            f"flattened names {key.removesuffix('.weight')!r}, but {key} pairs with "
            f"{unit.leaves[0].label}, not a Dense kernel; name only Linear layers in flattened"
        )
    return reorder_inputs(weight, inputs[key], to_flax)


def _rule(unit: Unit) -> str:
    """What follows a mismatch line's leaf label: the leaf's shape and the layout rule that
    gave the expected one, or ``""`` where values are copied as they are."""
    shapes = [tuple(leaf.value.shape) for leaf in unit.leaves]
    said = rule(unit.layout, shapes)
    shape = f" {shapes[0]}" if len(shapes) == 1 else ""
    return f"{shape}: {said}" if said else ""


def _unit_to_flax(
    unit: Unit,
    tensors: list[Any],
    keys: Sequence[str],
    problems: Problems,
    cast: bool,
    inputs: Mapping[str, tuple[int, ...]],
) -> list[Any] | None:
    shapes = [tuple(leaf.value.shape) for leaf in unit.leaves]
    wanted = torch_shapes(unit.layout, shapes)
    bad = [
        f"{key}: {tuple(t.shape)} in the state_dict, {w} for {unit.leaves[0].label}"
        for key, t, w in zip(keys, tensors, wanted, strict=True)
        if tuple(t.shape) != w
    ]
    if bad:
        reason = _rule(unit)
        bad = [line + reason for line in bad]
    try:
        arrays = [as_numpy(t) for t in tensors]
    except TypeError as e:
        bad.append(f"{', '.join(keys)}: {e}")
        problems.dtypes += bad
        return None
    if bad:
        problems.shapes += bad
        return None
    arrays = [
        _reordered(unit, k, a, inputs, to_flax=True) for k, a in zip(keys, arrays, strict=True)
    ]
    out = []
    for leaf, array in zip(unit.leaves, unit.layout.to_flax(arrays, shapes), strict=True):
        want = np.dtype(leaf.value.dtype)
        if array.dtype != want and not cast:
            problems.dtypes.append(
                f"{leaf.label}: {array.dtype} in the state_dict, {want} in the template "
                "(pass cast=True to convert)"
            )
            return None
        out.append(to_jax(array, want, leaf.value, leaf.label))
    return out


def _template_state_dict(torch_template: Any) -> tuple[StateDict, frozenset[str]]:
    """The template's state_dict, and which of its keys are a module's buffers."""
    if is_module(torch_template):
        buffers = torch_template.named_buffers(remove_duplicate=False)
        return torch_template.state_dict(), frozenset(name for name, _ in buffers)
    if isinstance(torch_template, Mapping):
        _usable(torch_template)
        return torch_template, frozenset()
    raise TypeError(
        f"torch_template must be an nn.Module or its state_dict, got {type(torch_template)}"
    )


def _to_template(
    array: np.ndarray, key: str, like: Any, problems: Problems, cast: bool, unit: Unit
) -> np.ndarray | None:
    if array.shape != tuple(like.shape):
        reason = _rule(unit)
        why = f"; {unit.leaves[0].label}{reason}" if reason else ""
        problems.shapes.append(
            f"{key}: {array.shape} from Flax, {tuple(like.shape)} in template{why}"
        )
        return None
    want = numpy_dtype(like.dtype)
    if array.dtype != want and not cast:
        problems.dtypes.append(
            f"{key}: {array.dtype} from Flax, {want} in the template (pass cast=True to convert)"
        )
        return None
    return array.astype(want, copy=False)


def _default_state_dict(flat: Flat, flattened: FeatureMaps | None) -> OrderedDict[str, np.ndarray]:
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    unit_of: dict[str, Unit] = {}
    written: dict[str, tuple[str, str]] = {}  # match key -> the leaf and name written
    for unit in units(flat.leaves):
        for name in unit.names:
            label, first = written.setdefault(match_key(name), (unit.leaves[0].label, name))
            if label != unit.leaves[0].label:
                raise ValueError(
                    f"{label} and {unit.leaves[0].label} would be written as {first!r} and "
                    f"{name!r}, which load back as one name; pass torch_template=your_module "
                    "to name them, or rename one of the Flax modules or leaves"
                )
        arrays = unit.layout.to_torch([np.asarray(leaf.value) for leaf in unit.leaves])
        out.update(zip(unit.names, map(as_numpy, arrays), strict=True))
        unit_of.update((name, unit) for name in unit.names)
        for name, (_, value) in zip(unit.torch_only, unit.layout.torch_only, strict=True):
            out[name] = np.array(value, np.int64)
    inputs = _feature_maps(flattened, {k: k for k in out}, out, "the Flax variables")
    for key in inputs:
        out[key] = _reordered(unit_of[key], key, out[key], inputs, to_flax=False)
    return out
