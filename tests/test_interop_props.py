"""Property tests of the pure pieces: the layout table, the dtype table, name normalisation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from interop._dtypes import to_numpy, to_torch
from interop._layouts import LEAVES, MODULES, torch_shapes
from interop._names import dotted, normalise

DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.int64, np.int8]
dims = st.integers(1, 4)


def _bits(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Arbitrary bit patterns (NaN payloads and all) of the given dtype."""
    size = np.dtype(dtype).itemsize
    raw = rng.integers(0, 256, (*shape, size), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


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


@given(st.lists(dims, max_size=3), st.sampled_from(DTYPES), st.integers(0, 2**32 - 1))
def test_dtype_table_is_bit_exact_both_ways(shape, dtype, seed) -> None:
    array = _bits(np.random.default_rng(seed), shape, dtype)
    tensor = to_torch(array)
    back = to_numpy(tensor)
    assert back.dtype == array.dtype and back.tobytes() == array.tobytes()
    assert not np.shares_memory(back, array)


names = st.from_regex(r"[a-z][a-z]{0,5}", fullmatch=True)


@given(st.lists(st.tuples(names, st.integers(0, 12)), min_size=1, max_size=4))
def test_linen_and_nnx_indices_name_the_same_torch_module(parts) -> None:
    linen = [f"{name}_{i}" for name, i in parts]
    nnx = [x for name, i in parts for x in (name, i)]
    torch_name = ".".join(f"{name}.{i}" for name, i in parts)
    assert dotted(linen) == dotted(nnx) == torch_name
    assert normalise(torch_name) == torch_name
