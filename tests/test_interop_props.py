"""Property tests of the pure pieces: the layout and dtype tables, names, rename rules,
matching, and the value converter behind ``save_checkpoint``."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import interop
from interop._checkpoint import _plain
from interop._dtypes import as_numpy, to_torch
from interop._layouts import LEAVES, MODULES, torch_shapes
from interop._match import match
from interop._names import apply_rename, compile_rename, dotted, normalise, usable_names

DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.int64, np.int8]
# Every dtype both sides have (issue 12): PyTorch and numpy/ml_dtypes, bit for bit.
ALL_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, ml_dtypes.bfloat16, np.float32, np.float64, ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz,
    ml_dtypes.float8_e8m0fnu, np.complex64, np.complex128,
]  # fmt: skip
dims = st.integers(1, 4)


def _bits(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads and all) of the given dtype; bools 0 or 1."""
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    size = np.dtype(dtype).itemsize
    raw = rng.integers(0, 256, (*shape, size), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _same_bits(got, want) -> bool:
    got, want = np.asarray(got), np.asarray(want)
    return got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


@given(st.lists(dims, min_size=2, max_size=5), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
def test_kernel_layout_round_trip(shape, dtype, seed) -> None:
    flax = _bits(np.random.default_rng(seed), shape, dtype)
    layout = LEAVES["kernel"]
    (torch_w,) = layout.to_torch([flax])
    *spatial, cin, cout = shape
    assert torch_w.shape == (cout, cin, *spatial)
    (back,) = layout.to_flax([torch_w], [flax.shape])
    assert back.tobytes() == flax.tobytes() and back.dtype == flax.dtype


@given(dims, dims, st.booleans(), st.integers(0, 2**32 - 1))
def test_attention_layout_round_trip(heads, head_dim, bias, seed) -> None:
    rng = np.random.default_rng(seed)
    e = heads * head_dim
    layout = MODULES[0] if bias else MODULES[1]
    inner = {"kernel": (e, heads, head_dim), "bias": (heads, head_dim)}
    out = {"kernel": (heads, head_dim, e), "bias": (e,)}
    shapes = [(out if part == "out" else inner)[leaf] for part, leaf in layout.flax]
    flax = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    torch_arrays = layout.to_torch(flax)
    assert [a.shape for a in torch_arrays] == torch_shapes(layout, shapes)
    assert torch_arrays[0].shape == (3 * e, e)
    for a, b in zip(layout.to_flax(torch_arrays, shapes), flax, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@settings(max_examples=8)
@given(st.lists(st.integers(0, 3), max_size=3), st.integers(0, 2**32 - 1))
def test_dtype_table_is_bit_exact_both_ways(dtype, shape, seed) -> None:
    """Every dtype, 0-d and empty arrays included, through tensors and the in-memory
    conversions in both directions."""
    array = _bits(np.random.default_rng(seed), shape, dtype)
    tensor = to_torch(array)
    assert str(tensor.dtype) == f"torch.{np.dtype(dtype).name}"
    back = as_numpy(tensor)
    assert _same_bits(back, array) and not np.shares_memory(back, array)
    template = {"params": {"m": {"w": jax.ShapeDtypeStruct(array.shape, array.dtype)}}}
    variables = interop.torch_to_flax({"m.w": tensor}, template)
    assert _same_bits(variables["params"]["m"]["w"], array)
    assert _same_bits(as_numpy(interop.flax_to_torch(variables)["m.w"]), array)


# Any name, and often one ending in ``_<digits>`` (``stage_1``, ``block_1_2``).
names = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True) | st.from_regex(
    r"[a-z]{1,3}(_[0-9]{1,2}){1,2}", fullmatch=True
)


@given(st.lists(st.tuples(names, st.integers(0, 12)), min_size=1, max_size=4))
def test_linen_and_nnx_indices_name_the_same_torch_module(parts) -> None:
    linen = [f"{name}_{i}" for name, i in parts]
    nnx = [x for name, i in parts for x in (name, i)]
    torch_name = ".".join(f"{name}.{i}" for name, i in parts)
    assert dotted(linen) == dotted(nnx) == normalise(torch_name)


@given(st.lists(names | st.integers(0, 12), min_size=1, max_size=5))
def test_normalise_is_idempotent_and_dotted_names_round_trip(path) -> None:
    name = dotted(path)
    assert normalise(name) == name
    assert dotted(name.split(".")) == name


keys = st.lists(st.from_regex(r"[a-z][a-z0-9_.]{0,10}", fullmatch=True), unique=True, max_size=6)


@given(keys, st.booleans())
def test_module_prefix_is_dropped_only_when_every_key_has_it(names, one_without) -> None:
    prefixed = [f"module.{k}" for k in names]
    if one_without:
        prefixed.append("head.bias")
        assert usable_names(prefixed) == {k: k for k in prefixed}
    else:
        assert usable_names(prefixed) == dict(zip(names, prefixed, strict=True))
    assert list(usable_names(prefixed).values()) == prefixed


text = st.text(alphabet="ab._01", max_size=8)


@given(st.lists(st.tuples(text.filter(bool), text), max_size=4), text, st.booleans())
def test_literal_rename_rules_act_like_str_replace_in_order(rules, name, as_mapping) -> None:
    items = list(dict(rules).items()) if as_mapping else rules
    escaped = [(re.escape(pattern), replacement) for pattern, replacement in items]
    compiled = compile_rename(dict(escaped) if as_mapping else escaped)
    assert [(p.pattern, r) for p, r in compiled] == escaped
    expected = name
    for pattern, replacement in items:
        expected = expected.replace(pattern, replacement)
    assert apply_rename(name, compiled) == expected
    assert compile_rename(None) == () and apply_rename(name, ()) == name


torch_names = st.lists(
    st.from_regex(r"[a-z]{1,4}(\.[0-9]|\.[a-z]{1,4}){0,3}", fullmatch=True),
    unique=True,
    min_size=1,
    max_size=10,
)


@given(torch_names, st.randoms(use_true_random=False), st.booleans(), st.booleans())
def test_match_pairs_every_name_whatever_the_order(names, random, linen_style, by_order) -> None:
    available = [re.sub(r"\.(\d)", r"_\1", n) for n in names] if linen_style else list(names)
    key = dict(zip(names, available, strict=True))
    random.shuffle(available)
    assert match(names, available, (), by_order) == key


@given(torch_names, st.integers(0, 4), st.integers(0, 4), st.randoms(use_true_random=False))
def test_match_by_order_pairs_only_the_leftovers_in_order(names, extra, spare, random) -> None:
    expected = [*names, *(f"flax{i}.weight" for i in range(extra))]
    available = [*names, *(f"torch{i}.weight" for i in range(spare))]
    random.shuffle(available)
    pairs = match(expected, available, (), True)
    assert {n: pairs[n] for n in names} == {n: n for n in names}
    leftovers = [k for k in available if k not in names]
    assert [pairs.get(e) for e in expected[len(names) :]] == [
        *leftovers[:extra],
        *[None] * max(0, extra - len(leftovers)),
    ]


modules = st.lists(st.from_regex(r"[a-z]{1,5}", fullmatch=True), unique=True, min_size=1)


@settings(max_examples=40, deadline=None)
@given(modules.flatmap(st.permutations), st.data())
def test_torch_to_flax_pairs_by_name_and_reports_every_mismatch_sorted(order, data) -> None:
    """Each module's ``bias`` is given ("="), left out ("-") or mis-shaped ("s"), in any order."""
    template = {"params": {m: {"bias": jax.ShapeDtypeStruct((2,), np.float32)} for m in order}}
    kinds = st.lists(st.sampled_from("=-s"), min_size=len(order), max_size=len(order))
    plan = dict(zip(order, data.draw(kinds), strict=True))
    extras = [f"extra{i}.bias" for i in range(data.draw(st.integers(0, 3)))]
    state_dict = {
        f"{m}.bias": torch.full((2 if kind == "=" else 3,), float(i))
        for i, (m, kind) in enumerate(plan.items())
        if kind != "-"
    }
    state_dict.update((e, torch.zeros(1)) for e in reversed(extras))
    value, report = interop.torch_to_flax(state_dict, template, strict=False)
    for i, (m, kind) in enumerate(plan.items()):
        if kind == "=":
            np.testing.assert_array_equal(value["params"][m]["bias"], [i, i])
    missing = [f"params/{m}/bias (needs {m}.bias)" for m, k in plan.items() if k == "-"]
    shapes = [
        f"{m}.bias: (3,) in the state_dict, (2,) for params/{m}/bias"
        for m, k in plan.items()
        if k == "s"
    ]
    assert report.missing == tuple(sorted(missing))
    assert report.shapes == tuple(sorted(shapes))
    assert report.unexpected == tuple(sorted(extras)) and report.dtypes == ()


def _numpy_values(dtype) -> st.SearchStrategy:
    elements = st.floats(width=32, allow_nan=False) if dtype == np.float32 else None
    return arrays(dtype, array_shapes(min_dims=0, max_dims=2, max_side=3), elements=elements)


leaves = st.one_of(
    st.sampled_from([np.float32, np.int64, np.bool_]).flatmap(_numpy_values),
    _numpy_values(np.float32).map(jnp.asarray),
    st.integers(-(2**40), 2**40).map(np.int64),
    st.floats(width=32, allow_nan=False).map(np.float32),
    st.integers() | st.floats(allow_nan=False) | st.text(max_size=3) | st.booleans() | st.none(),
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(deadline=None)
@given(values)
def test_plain_turns_numpy_and_jax_values_into_python_numbers_lists_or_arrays(value) -> None:
    listed, tensors = _plain(value), _plain(value, as_arrays=True)
    json.dumps(listed)
    _check_plain(value, listed, tensors)


def _check_plain(value, listed, tensors) -> None:
    if isinstance(value, Mapping):
        assert type(listed) is type(tensors) is dict and list(listed) == list(tensors) == list(
            value
        )
        for k in value:
            _check_plain(value[k], listed[k], tensors[k])
    elif isinstance(value, list | tuple):
        assert type(listed) is type(tensors) is type(value) and len(listed) == len(value)
        for parts in zip(value, listed, tensors, strict=True):
            _check_plain(*parts)
    elif isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) > 0:
        array = np.asarray(value)
        assert listed == array.tolist()
        assert isinstance(tensors, np.ndarray)
        assert tensors.dtype == array.dtype and tensors.tobytes() == array.tobytes()
    elif isinstance(value, np.generic | np.ndarray | jax.Array):
        item = np.asarray(value).item()
        assert type(listed) is type(tensors) is type(item) and listed == tensors == item
    else:
        assert listed is value and tensors is value


# Flax trees as users write them: module names that are list items (``blocks_1``) or not,
# leaf names that end in digits (``gamma_1``), layout leaves (``kernel``, ``scale``, ``mean``,
# ``var``), any dtype, 0-d and empty arrays.
part_names = st.from_regex(r"[a-z]{1,3}(_[0-9]{1,2}){0,2}", fullmatch=True)
LAYOUT_LEAVES = ("kernel", "scale", "embedding", "bias", "mean", "var", "weight_g", "weight_v")


@st.composite
def flax_trees(draw) -> dict:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def module(depth: int) -> dict:
        names = draw(st.lists(st.sampled_from(LAYOUT_LEAVES) | part_names, max_size=4, unique=True))
        weights = [n for n in names if n in ("kernel", "scale", "embedding")]
        out = {}
        for name in [n for n in names if n not in weights[1:]]:  # one ``weight`` per module
            if depth < 2 and draw(st.booleans()) and name not in LAYOUT_LEAVES:
                out[name] = module(depth + 1)
                continue
            low = 2 if name == "kernel" else 0
            shape = draw(st.lists(st.integers(0, 3), min_size=low, max_size=max(low, 3)))
            out[name] = _bits(rng, shape, draw(st.sampled_from(ALL_DTYPES)))
        return out or {"bias": np.zeros(2, np.float32)}

    return {"params": module(0)}


@settings(max_examples=30)
@given(flax_trees(), st.sampled_from(["pth", "safetensors"]))
def test_any_tree_interop_writes_loads_back_into_itself_bit_exact(tmp_path_factory, tree, suffix):
    path = tmp_path_factory.mktemp("tree") / f"ckpt.{suffix}"
    leaves = jax.tree.leaves(tree)
    if suffix == "safetensors" and any(a.dtype == np.complex128 for a in leaves):
        with pytest.raises(TypeError, match="complex128, which a safetensors file cannot hold"):
            interop.save_checkpoint(path, net=tree)
        return
    interop.save_checkpoint(path, net=tree, ema_net=tree)
    for which in ("net", "ema_net"):
        back = interop.load_checkpoint(path, tree, which=which)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        assert all(map(_same_bits, jax.tree.leaves(back), leaves))


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_tensor_names_ending_in_digits_keep_them_and_load_back(tmp_path, suffix) -> None:
    """The issue's case: a layer-scale ``gamma_1`` is a name, not a list index (``blocks_0``
    is one); what interop writes, it loads back, strictly."""
    tree = {"params": {"blk": {"gamma_1": jnp.ones(4)}, "blocks_0": {"lambda_2": jnp.zeros(2)}}}
    assert list(interop.flax_to_torch(tree)) == ["blk.gamma_1", "blocks.0.lambda_2"]
    path = tmp_path / f"ckpt.{suffix}"
    interop.save_checkpoint(path, net=tree)
    back = interop.load_checkpoint(path, tree)
    assert all(map(_same_bits, jax.tree.leaves(back), jax.tree.leaves(tree)))
