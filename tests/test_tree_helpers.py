"""Property tests of the pure tree helpers behind the transform and the EMA swap."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jema._trees import (
    all_finite,
    average_tree,
    cast_like,
    check_same_structure,
    compute_dtype,
    copy_floating,
    fill_masked,
    pure,
    shared_float_dtype,
)

floats = st.floats(-1e6, 1e6, width=32, allow_subnormal=False)  # XLA:CPU flushes them
vectors = hnp.arrays(np.float32, 4, elements=floats)
names = st.text("abcdef", min_size=1, max_size=3)


@given(ema=vectors, new=vectors, d=st.floats(0.0, 1.0))
def test_average_tree_is_sgs_formula_in_float32(ema, new, d):
    got = average_tree({"w": jnp.asarray(ema)}, {"w": jnp.asarray(new)}, (d, 1.0 - d))["w"]
    expected = ema * np.float32(d) + np.float32(1.0 - d) * new
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@given(ema=vectors, new=vectors)
def test_average_tree_endpoints_keep_or_replace(ema, new):
    keep = average_tree([jnp.asarray(ema)], [jnp.asarray(new)], (1.0, 0.0))[0]
    take = average_tree([jnp.asarray(ema)], [jnp.asarray(new)], (0.0, 1.0))[0]
    np.testing.assert_array_equal(keep, ema)
    np.testing.assert_array_equal(take, new)


@given(counts=hnp.arrays(np.int32, 3, elements=st.integers(-(2**31), 2**31 - 1)), new=vectors)
def test_average_tree_keeps_integer_leaves_and_none(counts, new):
    out = average_tree(
        {"n": jnp.asarray(counts), "w": jnp.zeros(4), "gone": None},
        {"n": jnp.zeros(3, jnp.int32), "w": jnp.asarray(new), "gone": None},
        (0.5, 0.5),
    )
    np.testing.assert_array_equal(out["n"], counts)
    assert out["gone"] is None


@given(
    values=st.lists(floats, min_size=1, max_size=6), bad=st.sampled_from([np.nan, np.inf, -np.inf])
)
def test_all_finite_flags_any_nonfinite_float(values, bad):
    tree = {"a": jnp.asarray(values, jnp.float32), "i": jnp.arange(3)}
    assert bool(all_finite(tree))
    poisoned = np.asarray(values, np.float32)
    poisoned[len(values) // 2] = bad
    assert not bool(all_finite(tree, {"b": jnp.asarray(poisoned)}))
    assert bool(all_finite(None, {"i": jnp.arange(2)}))


@given(keys=st.sets(names, min_size=1, max_size=4), extra=names)
def test_check_same_structure_names_missing_and_unexpected_paths(keys, extra):
    attached = {k: 0.0 for k in keys}
    check_same_structure(attached, dict(attached), "batch_stats")
    given_tree = {k: 0.0 for k in keys | {extra + "_x"}}
    with pytest.raises(ValueError, match=rf"unexpected \[\"\['{extra}_x'\]\"\]"):
        check_same_structure(attached, given_tree, "batch_stats")


@given(raw=vectors, ema=vectors, masked=st.booleans())
def test_fill_masked_and_cast_like_build_raw_shaped_new_arrays(raw, ema, masked):
    ema_tree = {"a": optax.MaskedNode() if masked else jnp.asarray(ema), "b": jnp.asarray(ema)}
    raw_tree = {"a": jnp.asarray(raw, jnp.bfloat16), "b": jnp.asarray(raw)}
    filled = fill_masked(raw_tree, ema_tree)
    assert filled["a"] is (raw_tree["a"] if masked else ema_tree["a"])
    cast = cast_like(raw_tree, ema_tree)
    assert cast["a"].dtype == jnp.bfloat16 and cast["b"].dtype == jnp.float32
    np.testing.assert_array_equal(cast["b"], ema)
    assert cast["b"].unsafe_buffer_pointer() != ema_tree["b"].unsafe_buffer_pointer()
    assert cast_like(None, None) is None


float_dtypes = st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32])


@given(
    leaf=float_dtypes,
    target=float_dtypes,
    at_least=st.booleans(),
    values=hnp.arrays(np.float32, 4, elements=st.floats(-6e4, 6e4, width=16)),
)
def test_copy_floating_casts_or_promotes_floats_and_keeps_the_rest(leaf, target, at_least, values):
    tree = {"w": jnp.asarray(values, leaf), "n": jnp.arange(3), "gone": None}
    out = copy_floating(tree, target, at_least=at_least)
    wanted = jnp.promote_types(leaf, target) if at_least else jnp.dtype(target)
    assert out["w"].dtype == wanted and out["n"].dtype == tree["n"].dtype and out["gone"] is None
    np.testing.assert_array_equal(out["w"], tree["w"].astype(wanted))
    assert out["w"].unsafe_buffer_pointer() != tree["w"].unsafe_buffer_pointer()
    assert copy_floating(tree)["w"].dtype == jnp.dtype(leaf)


@given(dtypes=st.lists(float_dtypes, min_size=1, max_size=4))
def test_shared_float_dtype_is_the_one_float_dtype_or_none(dtypes):
    tree = [jnp.zeros(1, d) for d in dtypes] + [jnp.zeros(1, jnp.int32)]
    expected = jnp.dtype(dtypes[0]) if len(set(map(jnp.dtype, dtypes))) == 1 else None
    assert shared_float_dtype(tree) == expected


@given(dtype=st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64]))
def test_compute_dtype_is_at_least_float32(dtype):
    assert compute_dtype(dtype) == (jnp.float64 if dtype == jnp.float64 else jnp.float32)


def test_pure_unwraps_nnx_variables_and_leaves_plain_trees():
    from flax import nnx

    assert pure({"w": 1.0}) == {"w": 1.0}
    assert pure({"w": nnx.Param(jnp.ones(2))})["w"].tolist() == [1.0, 1.0]
