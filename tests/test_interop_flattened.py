"""A Linear after ``nn.Flatten`` of a conv map: ``flattened={"fc": (C, H, W)}`` reorders the
kernel's rows between PyTorch's C, H, W flattening (NCHW) and Flax's H, W, C one (NHWC)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn as tnn

import interop
from interop._convert import state_dict
from interop._layouts import reorder_inputs
from tests.interop_models import randomized

C, H, W = 4, 5, 6  # H != W, so a swapped spatial order shows too
MAP = {"fc": (C, H, W)}


class TorchFlat(tnn.Module):
    """Conv2d -> ReLU -> Flatten -> Linear, as PyTorch classifiers without pooling end."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = tnn.Conv2d(3, C, 3, padding=1)
        self.relu, self.flatten = tnn.ReLU(), tnn.Flatten()
        self.fc = tnn.Linear(C * H * W, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu(self.conv(x))))


class LinenFlat(nn.Module):
    """The natural Flax twin: the same layers on NHWC, flattened by ``reshape(n, -1)``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(C, (3, 3), padding=((1, 1), (1, 1)), name="conv")(x))
        return nn.Dense(7, name="fc")(x.reshape(x.shape[0], -1))


X = np.random.default_rng(0).standard_normal((2, 3, H, W), np.float32)
TEMPLATE = jax.eval_shape(LinenFlat().init, jax.random.key(0), jnp.zeros((1, H, W, 3)))


def _torch_logits(model: tnn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


def _flax_logits(variables) -> np.ndarray:
    return np.asarray(LinenFlat().apply(variables, jnp.asarray(np.moveaxis(X, 1, -1))))


@pytest.fixture
def model() -> tnn.Module:
    return randomized(TorchFlat())


def test_without_the_option_the_logits_are_wrong_with_it_they_match(model) -> None:
    expected = _torch_logits(model)
    plain = _flax_logits(interop.torch_to_flax(model.state_dict(), TEMPLATE))
    assert np.max(np.abs(plain - expected)) > 0.5  # same shapes, strict load, wrong rows
    loaded = interop.torch_to_flax(model.state_dict(), TEMPLATE, flattened=MAP)
    np.testing.assert_allclose(_flax_logits(loaded), expected, rtol=1e-5, atol=1e-5)


def test_flax_to_torch_gives_torch_the_same_logits(model) -> None:
    variables = interop.torch_to_flax(model.state_dict(), TEMPLATE, flattened=MAP)
    expected = _flax_logits(variables)
    for template in (TorchFlat(), None):  # the module's names, and the default names
        fresh = TorchFlat().eval()
        fresh.load_state_dict(interop.flax_to_torch(variables, template, flattened=MAP))
        np.testing.assert_allclose(_torch_logits(fresh), expected, rtol=1e-5, atol=1e-5)
        back = interop.flax_to_torch(variables, template, flattened=MAP)
        assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_checkpoint_files_load_and_save_with_the_option(tmp_path, model, suffix) -> None:
    expected = _torch_logits(model)
    path = tmp_path / f"ckpt.{suffix}"
    if suffix == "pth":
        torch.save({"net": model.state_dict(), "ema_net": model.state_dict(), "epoch": 1}, path)
    else:
        safetensors.torch.save_file(model.state_dict(), path)
    variables = interop.load_checkpoint(path, TEMPLATE, flattened=MAP)
    np.testing.assert_allclose(_flax_logits(variables), expected, rtol=1e-5, atol=1e-5)
    saved = tmp_path / f"back.{suffix}"
    interop.save_checkpoint(saved, net=variables, torch_template=TorchFlat(), flattened=MAP)
    fresh = TorchFlat().eval()
    if suffix == "pth":
        fresh.load_state_dict(torch.load(saved, weights_only=True)["net"])
    else:
        net = safetensors.torch.load_file(saved)
        fresh.load_state_dict({k.removeprefix("net."): v for k, v in net.items()})
    np.testing.assert_array_equal(_torch_logits(fresh), expected)


def test_the_rows_move_as_the_two_flattenings_say() -> None:
    weight = np.random.default_rng(1).standard_normal((7, C * H * W)).astype(np.float32)
    sd = {"fc.weight": weight}
    template = {"params": {"fc": {"kernel": np.zeros((C * H * W, 7), np.float32)}}}
    kernel = np.asarray(
        interop.torch_to_flax(sd, template, flattened=MAP)["params"]["fc"]["kernel"]
    )
    for c, h, w in np.ndindex(C, H, W):  # Flax row (h, w, c) is PyTorch column (c, h, w)
        np.testing.assert_array_equal(kernel[(h * W + w) * C + c], weight[:, (c * H + h) * W + w])


@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), st.integers(1, 4))
def test_reordering_round_trips_bit_exactly(c, h, w, out) -> None:
    bits = np.random.default_rng(c * 1000 + h * 100 + w * 10 + out).integers(
        0, 2**32, (out, c * h * w), dtype=np.uint32
    )  # any float32 bit pattern: NaN payloads, -0.0, denormals
    weight = bits.view(np.float32)
    shape = (c, h, w)
    there = reorder_inputs(weight, shape, to_flax=True)
    assert np.array_equal(reorder_inputs(there, shape, to_flax=False).view(np.uint32), bits)
    sd = {"fc.weight": weight}
    template = {"params": {"fc": {"kernel": np.zeros((c * h * w, out), np.float32)}}}
    loaded = interop.torch_to_flax(sd, template, flattened={"fc": shape})
    kernel = np.asarray(loaded["params"]["fc"]["kernel"])
    assert np.array_equal(kernel.view(np.uint32), there.T.view(np.uint32))
    written = state_dict(loaded, sd, options={"flattened": {"fc": shape}})["fc.weight"]
    assert np.array_equal(written.view(np.uint32), bits)


def test_a_shape_of_another_size_is_refused_naming_the_layer(model) -> None:
    sd = model.state_dict()
    message = r"flattened\['fc'\] is \(4, 5, 5\), 100 values, but fc.weight \(7, 120\) in the "
    with pytest.raises(ValueError, match=message + "state_dict takes 120 inputs"):
        interop.torch_to_flax(sd, TEMPLATE, flattened={"fc": (4, 5, 5)})
    variables = interop.torch_to_flax(sd, TEMPLATE, flattened=MAP)
    with pytest.raises(ValueError, match=message + "torch_template takes 120 inputs"):
        interop.flax_to_torch(variables, model, flattened={"fc": (4, 5, 5)})
    with pytest.raises(ValueError, match=message + "Flax variables takes 120 inputs"):
        interop.flax_to_torch(variables, flattened={"fc": (4, 5, 5)})
    with pytest.raises(ValueError, match=r"flattened\['fc'\] is \(120,\); it must be the shape"):
        interop.torch_to_flax(sd, TEMPLATE, flattened={"fc": (120,)})
    with pytest.raises(ValueError, match=r"flattened\['fc'\] is \(0, 5, 6\)"):
        interop.torch_to_flax(sd, TEMPLATE, flattened={"fc": (0, 5, 6)})
    with pytest.raises(TypeError, match="flattened must map PyTorch Linear names"):
        interop.torch_to_flax(sd, TEMPLATE, flattened={"fc": 120})


def test_a_key_naming_no_linear_weight_is_refused(tmp_path, model) -> None:
    sd = model.state_dict()
    with pytest.raises(
        ValueError, match=r"'head', but head.weight in the state_dict is not there; "
    ):
        interop.torch_to_flax(sd, TEMPLATE, flattened={"head": MAP["fc"]})
    with pytest.raises(ValueError, match=r"Linear layers there: 'fc'$"):
        interop.torch_to_flax(sd, TEMPLATE, flattened={"head": MAP["fc"]})
    with pytest.raises(ValueError, match=r"conv.weight in the state_dict is \(4, 3, 3, 3\), not"):
        interop.torch_to_flax(sd, TEMPLATE, flattened={"conv": MAP["fc"]})
    variables = interop.torch_to_flax(sd, TEMPLATE)
    with pytest.raises(ValueError, match=r"'fc.bias', but fc.bias.weight in the torch_template"):
        interop.save_checkpoint(tmp_path / "x.pth", net=variables, torch_template=model,
                                flattened={"fc.bias": MAP["fc"]})  # fmt: skip
    assert not (tmp_path / "x.pth").exists()
    embedding = {"emb.weight": np.ones((4, 6), np.float32)}
    table = {"params": {"emb": {"embedding": np.zeros((4, 6), np.float32)}}}
    with pytest.raises(ValueError, match="emb.weight pairs with params/emb/embedding, not a Dense"):
        interop.torch_to_flax(embedding, table, flattened={"emb": (2, 3)})
