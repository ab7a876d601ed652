"""The layout table: how Flax leaves map onto PyTorch tensors, used in both directions.

Each entry names a Flax module's leaves (relative paths), the PyTorch tensors they become
(relative names, in PyTorch's registration order), and one function per direction.

- ``kernel`` <-> ``weight``: Linear (O, I) <-> Dense (I, O), and Conv1d/2d/3d (grouped and
  depthwise) (O, I/g, *S) <-> Conv (*S, I/g, O). ConvTranspose (I, O/g, *S) maps with the same
  permutation onto ``flax ConvTranspose(transpose_kernel=True)`` with explicit padding
  ``(d*(k-1)-p, d*(k-1)-p+output_padding)`` per spatial axis (Flax has no grouped transpose).
- ``scale`` <-> ``weight`` (BatchNorm, LayerNorm, GroupNorm), ``embedding`` <-> ``weight``,
  ``bias`` <-> ``bias``, BatchNorm ``mean``/``var`` <-> ``running_mean``/``running_var``.
- Multi-head attention: Flax ``query``/``key``/``value`` kernels (E, H, D) and ``out`` (H, D, E)
  <-> PyTorch's packed ``in_proj_weight`` (3E, E) and ``out_proj.weight`` (E, E), with biases.
- Any other leaf keeps its name and values (a bare ``nn.Parameter`` such as ``cls_token``, a
  layer-scale ``gamma_1``, weight norm's ``weight_g``/``weight_v`` in either spelling).
- A Linear after ``nn.Flatten`` of a conv map (NCHW: inputs in C, H, W order) whose Flax twin
  flattens NHWC (``x.reshape(n, -1)``: H, W, C order) has the same shape and other rows; the
  option ``flattened={"fc": (C, H, W)}`` reorders them (``reorder_inputs``), both directions.

PyTorch buffers with no Flax twin (BatchNorm's ``num_batches_tracked``) belong to the entry
whose module has them, with the value a new state_dict gives them; they stay on the PyTorch side,
as do the other tensors ``is_torch_only`` tells by value (index tables, masks, sinusoids).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from interop._dtypes import as_numpy

Arrays = Sequence[np.ndarray]
Shapes = Sequence[tuple[int, ...]]
FeatureMaps = Mapping[str, Sequence[int]]
"""PyTorch Linear names -> the (C, *spatial) shape of the conv map each one's input flattens."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """One Flax module's leaves <-> one PyTorch module's tensors."""

    flax: tuple[tuple[str, ...], ...]
    torch: tuple[str, ...]
    to_torch: Callable[[Arrays], list[np.ndarray]]
    to_flax: Callable[[Arrays, Shapes], list[np.ndarray]]
    torch_only: tuple[tuple[str, int], ...] = ()  # (relative name, int64 value when made anew)


def _same(arrays: Arrays, shapes: Shapes = ()) -> list[np.ndarray]:
    return list(arrays)


def _kernel_to_torch(arrays: Arrays) -> list[np.ndarray]:
    (k,) = arrays
    n = k.ndim
    return [np.transpose(k, (n - 1, n - 2, *range(n - 2)))]


def _kernel_to_flax(arrays: Arrays, shapes: Shapes) -> list[np.ndarray]:
    (w,) = arrays
    n = w.ndim
    return [np.transpose(w, (*range(2, n), 1, 0))]


def _attention(bias: bool) -> Layout:
    parts = ("query", "key", "value", "out")
    leaves = ("kernel", "bias") if bias else ("kernel",)
    flax = tuple((p, leaf) for p in parts for leaf in leaves)
    torch: tuple[str, ...] = ("in_proj_weight", "in_proj_bias") if bias else ("in_proj_weight",)
    torch += ("out_proj.weight", "out_proj.bias") if bias else ("out_proj.weight",)

    def to_torch(arrays: Arrays) -> list[np.ndarray]:
        by = dict(zip(flax, arrays, strict=True))
        e = by["out", "kernel"].shape[-1]
        qkv = [by[p, "kernel"] for p in parts[:3]]
        out = [np.concatenate([k.reshape(k.shape[0], -1).T for k in qkv])]
        if bias:
            out.append(np.concatenate([by[p, "bias"].reshape(-1) for p in parts[:3]]))
        out.append(by["out", "kernel"].reshape(-1, e).T)
        if bias:
            out.append(by["out", "bias"])
        return out

    def to_flax(arrays: Arrays, shapes: Shapes) -> list[np.ndarray]:
        by = dict(zip(torch, arrays, strict=True))
        want = dict(zip(flax, shapes, strict=True))
        qkv = np.split(by["in_proj_weight"], 3)
        b = np.split(by["in_proj_bias"], 3) if bias else []
        out: list[np.ndarray] = []
        for i, (p, w) in enumerate(zip(parts[:3], qkv, strict=True)):
            out.append(w.T.reshape(want[p, "kernel"]))
            if bias:
                out.append(b[i].reshape(want[p, "bias"]))
        out.append(by["out_proj.weight"].T.reshape(want["out", "kernel"]))
        if bias:
            out.append(by["out_proj.bias"])
        return out

    return Layout(flax, torch, to_torch, to_flax)


LEAVES: dict[str, Layout] = {
    "kernel": Layout((("kernel",),), ("weight",), _kernel_to_torch, _kernel_to_flax),
    "scale": Layout((("scale",),), ("weight",), _same, _same),
    "embedding": Layout((("embedding",),), ("weight",), _same, _same),
    "bias": Layout((("bias",),), ("bias",), _same, _same),
    "mean": Layout((("mean",),), ("running_mean",), _same, _same),
    "var": Layout(
        (("var",),), ("running_var",), _same, _same, torch_only=(("num_batches_tracked", 0),)
    ),
}
MODULES: tuple[Layout, ...] = (_attention(bias=True), _attention(bias=False))
_TORCH_ONLY = frozenset(
    name for layout in (*LEAVES.values(), *MODULES) for name, _ in layout.torch_only
)


_TWINNED = frozenset(  # PyTorch names some layout entry has a Flax twin for
    name.rsplit(".", 1)[-1] for layout in (*LEAVES.values(), *MODULES) for name in layout.torch
)


def is_torch_only(key: str, value: Any = None, buffer: bool = False) -> bool:
    """Whether a PyTorch tensor has no Flax twin: Flax models do not store it.

    Such tensors are a buffer a layout entry keeps on PyTorch's side (``num_batches_tracked``,
    told by name); an integer or bool tensor (an index table such as ``position_ids``, a causal
    mask); a sinusoidal position table (Pegasus, Marian, RoFormer: constant, computed by the
    Flax model); and, when it is known to be a module's buffer, any buffer whose name no layout
    entry has a twin for (``running_mean`` has one: a BatchNorm's Flax ``mean``).

    Args:
      key: a state_dict key.
      value: its tensor or array, when known.
      buffer: whether it is a buffer of the module it came from.

    Returns:
      True for such a tensor.

    Example:
      >>> is_torch_only("bn1.num_batches_tracked"), is_torch_only("bn1.running_var")
      (True, False)
      >>> is_torch_only("pos.weight", np.cos(np.arange(8)[:, None] / [1.0, 10.0, 100.0]))
      True
    """
    name = key.rsplit(".", 1)[-1]
    if name in _TORCH_ONLY or (buffer and name not in _TWINNED):
        return True
    try:
        array = as_numpy(value)
    except TypeError:  # no value, or none numpy can hold (a meta or sparse tensor)
        return False
    return array.dtype.kind in "biu" or _sinusoidal(array)


def _sinusoidal(table: np.ndarray) -> bool:
    """Whether each column of a (positions, features) table is a sinusoid of the position,
    ``sin(p * w + phase)``, as any sinusoidal position encoding's columns are: such a column
    satisfies ``x[p + 1] + x[p - 1] = 2 cos(w) x[p]``. The table must reach 1 (a cosine column
    at p = 0) and some column must swing by at least 1, so neither a small learned embedding nor
    a constant is taken for one."""
    if table.ndim != 2 or table.shape[0] < 4 or not table.size or table.dtype.kind not in "fV":
        return False
    try:
        x = table.astype(np.float64)
    except (TypeError, ValueError):
        return False
    reach, swing = np.max(np.abs(x)), np.max(np.ptp(x, axis=0))
    if not (np.isfinite(x).all() and 0.99 <= reach <= 1.01 and swing >= 1):
        return False
    mid, outer = x[1:-1], x[2:] + x[:-2]
    ratio = (outer * mid).sum(0) / np.maximum((mid * mid).sum(0), 1e-300)
    # Rounding to the dtype, plus the phase drift of a table computed in float32 (p * w).
    tolerance = 8 * float(ml_dtypes.finfo(table.dtype).eps) + 4e-7 * table.shape[0]
    return bool(np.max(np.abs(outer - ratio * mid)) <= tolerance)


def for_leaf(name: str) -> Layout:
    """The layout entry for one Flax leaf name.

    Args:
      name: the leaf's last key, e.g. ``"kernel"``.

    Returns:
      Its ``LEAVES`` entry, or one that keeps the name and values for a name not in the table.

    Example:
      >>> for_leaf("scale").torch, for_leaf("cls_token").torch
      (('weight',), ('cls_token',))
    """
    return LEAVES.get(name) or Layout(((name,),), (name,), _same, _same)


def torch_shapes(layout: Layout, flax_shapes: Shapes) -> list[tuple[int, ...]]:
    """The PyTorch shapes that a set of Flax shapes becomes, without touching real data.

    Args:
      layout: a layout entry.
      flax_shapes: the shapes of its Flax leaves, in ``layout.flax`` order.

    Returns:
      The shapes of its PyTorch tensors, in ``layout.torch`` order.

    Raises:
      ValueError: when the shapes do not fit the layout (e.g. a 1-D kernel).

    Example:
      >>> torch_shapes(LEAVES["kernel"], [(3, 3, 8, 16)])
      [(16, 8, 3, 3)]
    """
    dummies = [np.broadcast_to(np.int8(0), s) for s in flax_shapes]
    return [tuple(a.shape) for a in layout.to_torch(dummies)]


_SPATIAL = {1: "k", 2: "kh, kw", 3: "kd, kh, kw"}


def rule(layout: Layout, flax_shapes: Shapes) -> str:
    """The layout rule that turns Flax shapes into PyTorch's, in words, for error messages.

    Args:
      layout: a layout entry.
      flax_shapes: the shapes of its Flax leaves, in ``layout.flax`` order.

    Returns:
      The rule, or ``""`` for an entry that copies values as they are.

    Example:
      >>> rule(LEAVES["kernel"], [(3, 3, 8, 16)])
      'a Conv kernel (kh, kw, I/g, O) is a Conv2d weight (O, I/g, kh, kw)'
      >>> rule(LEAVES["bias"], [(16,)])
      ''
    """
    if layout is LEAVES["kernel"]:
        n = len(flax_shapes[0])
        if n == 2:
            return "a Dense kernel (I, O) is a Linear weight (O, I)"
        s, conv = _SPATIAL.get(n - 2, "*S"), f"Conv{n - 2}d" if n - 2 in _SPATIAL else "conv"
        return f"a Conv kernel ({s}, I/g, O) is a {conv} weight (O, I/g, {s})"
    if layout in MODULES:
        return (
            "query/key/value kernels (E, H, D) are in_proj_weight (3E, E) in three, transposed; "
            "out (H, D, E) is out_proj.weight (E, E) transposed"
        )
    return ""


def feature_maps(
    flattened: FeatureMaps, weights: Mapping[str, tuple[int, ...]], where: str
) -> dict[str, tuple[int, ...]]:
    """Checks the ``flattened`` option against the PyTorch side's tensors.

    Args:
      flattened: ``{"fc": (C, H, W)}``: the PyTorch name of each Linear that follows a
        ``nn.Flatten`` of a conv map, and that map's shape in PyTorch's order (C first: a
        Conv1d map is (C, L), a Conv3d map (C, D, H, W)).
      weights: PyTorch names -> shapes of the tensors the Linear weights are looked up in.
      where: names that side in messages, e.g. ``"the state_dict"``.

    Returns:
      Each Linear's weight name (``fc.weight``) -> its feature map.

    Raises:
      TypeError: when ``flattened`` is not a mapping of names to tuples of ints.
      ValueError: naming the layer for a key whose ``<key>.weight`` is not a 2-D tensor of
        ``weights``, a shape of fewer than 2 sizes or a size below 1, or a shape whose product
        is not the weight's input size (both named).

    Example:
      >>> feature_maps({"fc": (8, 4, 4)}, {"fc.weight": (10, 128)}, "the state_dict")
      {'fc.weight': (8, 4, 4)}
    """
    if not isinstance(flattened, Mapping) or not all(
        isinstance(name, str)
        and isinstance(shape, Sequence)
        and all(isinstance(n, int | np.integer) for n in shape)
        for name, shape in flattened.items()
    ):
        raise TypeError(
            "flattened must map PyTorch Linear names to the (C, H, W) shape of the conv map "
            f'each flattens, e.g. {{"fc": (16, 7, 7)}}; got {flattened!r}'
        )
    out = {}
    for layer, shape in flattened.items():
        key, feature_map = f"{layer}.weight", tuple(int(n) for n in shape)
        if len(weights.get(key, ())) != 2:
            linear = [repr(k.removesuffix(".weight")) for k, s in weights.items()
                      if k.endswith(".weight") and len(s) == 2]  # fmt: skip
            found = f"is {weights[key]}, not a Linear weight (out, in)" if key in weights else ""
            raise ValueError(
                f"flattened names {layer!r}, but {key} in {where} {found or 'is not there'}; "
                f"Linear layers there: {', '.join(linear) or 'none'}"
            )
        if len(feature_map) < 2 or min(feature_map) < 1:
            raise ValueError(
                f"flattened[{layer!r}] is {feature_map}; it must be the shape of a conv map "
                "in PyTorch's order, C then at least one spatial size, each at least 1: "
                "(C, L), (C, H, W) or (C, D, H, W)"
            )
        inputs = weights[key][1]
        if math.prod(feature_map) != inputs:
            raise ValueError(
                f"flattened[{layer!r}] is {feature_map}, {math.prod(feature_map)} values, but "
                f"{key} {weights[key]} in {where} takes {inputs} inputs; pass the (C, H, W) "
                "shape of the conv map its nn.Flatten flattens"
            )
        out[key] = feature_map
    return out


def reorder_inputs(weight: np.ndarray, feature_map: tuple[int, ...], to_flax: bool) -> np.ndarray:
    """A Linear weight's inputs reordered between PyTorch's (C, *S) flattening of a conv map
    and Flax's (*S, C) one: the same shape, the same values, the columns moved.

    Args:
      weight: a PyTorch-layout Linear weight (O, I), I the product of ``feature_map``.
      feature_map: (C, *S), PyTorch's order.
      to_flax: from PyTorch's column order to Flax's; False for the way back.

    Returns:
      The reordered (O, I) weight.

    Example:
      >>> w = np.arange(6).reshape(1, 6)  # C=2, H=1, W=3: columns c0h0w0, c0h0w1, ..., c1h0w2
      >>> reorder_inputs(w, (2, 1, 3), to_flax=True)
      array([[0, 3, 1, 4, 2, 5]])
      >>> reorder_inputs(reorder_inputs(w, (2, 1, 3), True), (2, 1, 3), False)
      array([[0, 1, 2, 3, 4, 5]])
    """
    channels, spatial = feature_map[0], feature_map[1:]
    out = weight.shape[0]
    if to_flax:
        return np.moveaxis(weight.reshape(out, channels, *spatial), 1, -1).reshape(weight.shape)
    return np.moveaxis(weight.reshape(out, *spatial, channels), -1, 1).reshape(weight.shape)
