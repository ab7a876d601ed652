"""PyTorch ``nn.Sequential`` against nnx ``Sequential`` and linen ``nn.Sequential`` twins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import interop
from tests.interop_models import (
    LinenCompactSequential,
    LinenSequential,
    NnxSequential,
    TorchSequential,
    randomized,
)

X = np.random.default_rng(0).standard_normal((5, 4), dtype=np.float32)
COMPACT_RENAME = {
    r"^layers\.0\.": "Dense.0.",
    r"^layers\.2\.": "BatchNorm.0.",
    r"^layers\.3\.0\.": "Dense.1.",
}


def _torch() -> tuple[torch.nn.Module, np.ndarray]:
    model = randomized(TorchSequential(), 5)
    with torch.no_grad():
        return model, model(torch.from_numpy(X)).numpy()


def _nnx_model(variables) -> nnx.Module:
    model = nnx.eval_shape(lambda: NnxSequential(nnx.Rngs(0)))
    nnx.update(model, variables)
    return model


def _nnx_run(variables) -> np.ndarray:
    return np.asarray(_nnx_model(variables)(jnp.asarray(X)))


def _torch_run(state_dict) -> np.ndarray:
    model = TorchSequential().eval()
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


@pytest.mark.parametrize("template", ["module", "state"])
def test_nnx_sequential_loads_torch_sequential_by_default_names(template) -> None:
    model, expected = _torch()
    abstract = nnx.eval_shape(lambda: NnxSequential(nnx.Rngs(0)))
    if template == "state":  # module types unknown: the fallback without ``layers`` finds them
        abstract = nnx.state(abstract, (nnx.Param, nnx.BatchStat))
    variables = interop.torch_to_flax(model.state_dict(), abstract)
    np.testing.assert_allclose(_nnx_run(variables), expected, atol=1e-5)
    back = interop.flax_to_torch(variables, model)
    np.testing.assert_allclose(_torch_run(back), expected, atol=1e-5)
    # Without a template the names come from the module types: an nnx Module, not a State.
    back = interop.flax_to_torch(_nnx_model(variables))
    np.testing.assert_allclose(_torch_run(back), expected, atol=1e-5)


def test_nnx_sequential_default_names_are_torch_names() -> None:
    model = NnxSequential(nnx.Rngs(0))
    names = list(interop.flax_to_torch(model))
    assert sorted(names) == sorted(TorchSequential().state_dict())


def test_nnx_sequential_round_trip_through_a_checkpoint(tmp_path) -> None:
    model, expected = _torch()
    path = tmp_path / "seq.pth"
    torch.save({"net": model.state_dict()}, path)
    loaded = interop.load_checkpoint(path, NnxSequential(nnx.Rngs(1)))
    np.testing.assert_allclose(_nnx_run(loaded), expected, atol=1e-5)


def test_linen_sequential_in_setup_loads_by_default_names() -> None:
    model, expected = _torch()
    template = jax.eval_shape(LinenSequential().init, jax.random.key(0), X)
    variables = interop.torch_to_flax(model.state_dict(), template)
    np.testing.assert_allclose(LinenSequential().apply(variables, X), expected, atol=1e-5)
    back = interop.flax_to_torch(variables, model)
    np.testing.assert_allclose(_torch_run(back), expected, atol=1e-5)


def test_linen_compact_sequential_needs_the_documented_rename_rules() -> None:
    model, expected = _torch()
    template = jax.eval_shape(LinenCompactSequential().init, jax.random.key(0), X)
    with pytest.raises(ValueError, match="Dense_0"):
        interop.torch_to_flax(model.state_dict(), template)
    variables = interop.torch_to_flax(model.state_dict(), template, rename=COMPACT_RENAME)
    np.testing.assert_allclose(LinenCompactSequential().apply(variables, X), expected, atol=1e-5)
    back = interop.flax_to_torch(variables, model, rename=COMPACT_RENAME)
    np.testing.assert_allclose(_torch_run(back), expected, atol=1e-5)


def test_a_real_layers_layers_key_still_matches_exactly() -> None:
    """The fallback only applies to names not found as they are."""
    state_dict = {"layers.layers.0.weight": torch.ones(3, 2), "layers.0.weight": torch.zeros(3, 2)}
    kernel = jax.ShapeDtypeStruct((2, 3), np.float32)
    template = {
        "params": {"layers": {"layers_0": {"kernel": kernel}}, "layers_0": {"kernel": kernel}}
    }
    out = interop.torch_to_flax(state_dict, template)["params"]
    assert float(out["layers"]["layers_0"]["kernel"].sum()) == 6.0
    assert float(out["layers_0"]["kernel"].sum()) == 0.0
