"""jema._checks: the one range check and the one dtype check every setting goes through."""

import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jema._checks import check_floating_dtype, check_number

finite = st.floats(-1e6, 1e6, allow_nan=False)
CLOSED = ["", "low", "high", "both"]


@given(finite, finite, st.floats(0, 1e6), st.sampled_from(CLOSED))
def test_check_number_is_the_interval_test(x, low, width, closed):
    high = low + width
    above = x >= low if closed in ("low", "both") else x > low
    below = x <= high if closed in ("high", "both") else x < high
    if above and below:
        assert check_number(x, "opt", "be in range", low=low, high=high, closed=closed) == x
    else:
        with pytest.raises(ValueError, match=f"^opt must be in range; got {re.escape(repr(x))}$"):
            check_number(x, "opt", "be in range", low=low, high=high, closed=closed)


@given(st.integers(-(2**40), 2**40))
def test_ints_and_whole_floats_come_back_as_ints(n):
    for kind in ("int", "whole"):
        out = check_number(n, "k", "be an int", kind=kind)
        assert out == n and type(out) is int
        out = check_number(np.int64(n), "k", "be an int", kind=kind)
        assert out == n and type(out) is int
    out = check_number(float(n), "k", "be whole", kind="whole")
    assert out == n and type(out) is int
    with pytest.raises(ValueError, match=f"k must be an int; got {n}.0"):
        check_number(float(n), "k", "be an int", kind="int")


@pytest.mark.parametrize(
    "bad", [True, np.bool_(True), "1", None, [1], np.ones(2), 1 + 0j, jnp.ones(1)]
)
def test_non_numbers_are_refused_with_the_chosen_error(bad):
    with pytest.raises(TypeError, match=f"^x must be a number; got {re.escape(repr(bad))}$"):
        check_number(bad, "x", "be a number", wrong_type=TypeError)
    with pytest.raises(ValueError, match="^x must be a number; got"):
        check_number(bad, "x", "be a number")


def test_out_of_range_is_a_value_error_whatever_wrong_type_is():
    with pytest.raises(ValueError, match="step must be a non-negative int; got -1"):
        check_number(-1, "step", "be a non-negative int", low=0, closed="low", wrong_type=TypeError)
    with pytest.raises(ValueError, match="w must be whole; got 2.5"):
        check_number(2.5, "w", "be whole", kind="whole")
    with pytest.raises(ValueError, match="x must be a number; got nan"):
        check_number(math.nan, "x", "be a number", wrong_type=TypeError)
    assert check_number(jnp.float32(0.25), "w", "be a number", low=0, high=1) == 0.25
    assert check_number(np.float16(2), "w", "be whole", kind="whole") == 2


@pytest.mark.parametrize(
    "dtype",
    ["float32", jnp.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, np.float16],
)
def test_floating_dtypes_pass_bfloat16_and_float8_included(dtype):
    assert check_floating_dtype(dtype, "dtype", "'float32'") == np.dtype(dtype)


@pytest.mark.parametrize("dtype", ["int32", jnp.int8, bool, "complex64", "nope", object])
def test_other_dtypes_are_refused_naming_the_setting(dtype):
    message = (
        f"^ema_dtype must be a floating dtype such as jnp.float32; got {re.escape(repr(dtype))}$"
    )
    with pytest.raises(ValueError, match=message):
        check_floating_dtype(dtype, "ema_dtype", "jnp.float32")


def test_an_array_as_dtype_points_at_static_args():
    with pytest.raises(ValueError, match="pass static_args='ema_dtype' to it"):
        check_floating_dtype(jnp.zeros(()), "ema_dtype", "jnp.float32")


def test_python_ints_of_any_size_are_numbers():
    assert check_number(10**20, "step", "be a positive int", low=0, kind="int") == 10**20
    assert check_number(2**1022 * 3, "step", "be whole", low=0, kind="whole") == 2**1022 * 3
    assert check_number(10**400, "step", "be a positive int", low=0, kind="int") == 10**400
    with pytest.raises(
        ValueError, match=r"step must be below 2\*\*31; got 1000.*\(401 characters\)$"
    ):
        check_number(10**400, "step", "be below 2**31", high=2**31, kind="int")
    with pytest.raises(ValueError, match="beta must be a finite number; got 1000"):  # past floats
        check_number(10**400, "beta", "be a finite number")


def test_a_traced_value_is_refused_naming_the_setting():
    check = jax.jit(lambda s: check_number(s, "step", "be a positive number", low=0))
    with pytest.raises(ValueError, match="step must be a positive number; got .*Tracer"):
        check(3.0)
