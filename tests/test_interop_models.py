"""Real PyTorch models against their Flax twins (linen and nnx), both directions."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

import interop
from tests.interop_models import TWINS, Twin, randomized

KINDS = ("linen", "nnx")


@functools.cache
def _setup(name: str) -> tuple[Twin, torch.nn.Module, np.ndarray, np.ndarray]:
    twin = TWINS[name]
    model = randomized(twin.torch())
    x = twin.inputs(np.random.default_rng(0))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    return twin, model, x, expected


def _flax_template(twin: Twin, kind: str, x: np.ndarray):
    """Abstract: linen variables from ``jax.eval_shape``, or an abstract nnx model."""
    if kind == "linen":
        return jax.eval_shape(twin.linen().init, jax.random.key(0), twin.flax_input(x))
    return nnx.eval_shape(lambda: twin.nnx(nnx.Rngs(0)))


@functools.cache
def _linen_apply(name: str):
    return jax.jit(TWINS[name].linen().apply)


@nnx.jit
def _nnx_apply(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


def _run_flax(name: str, kind: str, variables, x: np.ndarray) -> np.ndarray:
    twin = TWINS[name]
    if kind == "linen":
        return twin.torch_output(_linen_apply(name)(variables, twin.flax_input(x)))
    model = _flax_template(twin, kind, x)
    nnx.update(model, variables)
    return twin.torch_output(_nnx_apply(model, twin.flax_input(x)))


def _flax_random(twin: Twin, kind: str, x: np.ndarray):
    """Random Flax weights (numpy: no slow eager initialisers), positive variances."""
    template = _flax_template(twin, kind, x)
    if kind == "nnx":
        template = nnx.state(template, (nnx.Param, nnx.BatchStat))
    rng = np.random.default_rng(4)

    def draw(path, leaf):
        value = rng.standard_normal(leaf.shape, np.float32) * 0.5
        return np.abs(value) + 0.5 if str(path[-1]).strip(".[]'") == "var" else value

    return jax.tree_util.tree_map_with_path(draw, template)


def _assert_identical(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TWINS))
def test_torch_to_flax_gives_same_outputs(name: str, kind: str) -> None:
    twin, model, x, expected = _setup(name)
    variables = interop.torch_to_flax(model.state_dict(), _flax_template(twin, kind, x))
    np.testing.assert_allclose(_run_flax(name, kind, variables, x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TWINS))
def test_flax_to_torch_loads_strictly_and_gives_same_outputs(name: str, kind: str) -> None:
    twin, _, x, _ = _setup(name)
    variables = _flax_random(twin, kind, x)
    expected = _run_flax(name, kind, variables, x)
    for template in (twin.torch(), None) if twin.complete else (twin.torch(),):
        model = twin.torch().eval()
        model.load_state_dict(interop.flax_to_torch(variables, template), strict=True)
        with torch.no_grad():
            actual = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(actual, expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(TWINS))
def test_torch_flax_torch_is_bit_identical(name: str, kind: str) -> None:
    twin, model, x, _ = _setup(name)
    state_dict = model.state_dict()
    variables = interop.torch_to_flax(state_dict, _flax_template(twin, kind, x))
    _assert_identical(interop.flax_to_torch(variables, model), state_dict)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["cnn", "attention", "decoder", "conv1d"])
def test_bfloat16_round_trip_is_bit_exact(name: str, kind: str) -> None:
    twin, model, x, _ = _setup(name)
    model16 = randomized(twin.torch()).to(torch.bfloat16)
    template = _flax_template(twin, kind, x)
    if kind == "nnx":
        template = nnx.state(template, (nnx.Param, nnx.BatchStat))
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), template)
    variables = interop.torch_to_flax(model16.state_dict(), template)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {np.dtype(ml_dtypes.bfloat16)}
    _assert_identical(interop.flax_to_torch(variables, model16), model16.state_dict())
