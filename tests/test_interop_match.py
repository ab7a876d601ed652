"""Matching and reporting: rename rules, order-based matching, collected errors, dtypes."""

from __future__ import annotations

import copy
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util
from torch import nn as tnn

import interop
from tests.interop_models import (
    LinenAttention,
    LinenMLP,
    NnxMLP,
    TorchAttention,
    TorchCNN,
    TorchMLP,
    randomized,
)

X_MLP = jnp.zeros((1, 4))
MLP_T = jax.eval_shape(LinenMLP().init, jax.random.key(0), X_MLP)


_normal = nn.initializers.normal()


class AutoNamedCNN(nn.Module):
    """TorchCNN's twin with linen's automatic names (Conv_0, BatchNorm_0, ...)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for features, stride in ((8, 1), (16, 2)):
            conv = nn.Conv(features, (3, 3), stride, ((1, 1), (1, 1)), kernel_init=_normal)
            x = conv(x)
            x = nn.relu(nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)(x))
        return nn.Dense(10, kernel_init=_normal)(x.mean((1, 2)))


def test_match_by_order_loads_auto_named_linen() -> None:
    model = randomized(TorchCNN())
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8), np.float32)
    # Eager init keeps linen's first-call order; jax.eval_shape and jit return sorted keys.
    template = AutoNamedCNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="14 missing"):
        interop.torch_to_flax(model.state_dict(), template)
    variables = interop.torch_to_flax(model.state_dict(), template, match_by_order=True)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    actual = AutoNamedCNN().apply(variables, jnp.asarray(np.moveaxis(x, 1, -1)))
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    back = interop.flax_to_torch(variables, model, match_by_order=True)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_match_by_order_checks_shapes_and_refuses_nnx() -> None:
    sd = TorchMLP().state_dict()
    swapped = dict(reversed(list(sd.items())))
    with pytest.raises(ValueError, match="shapes"):
        interop.torch_to_flax(
            {f"x{i}": v for i, v in enumerate(swapped.values())}, MLP_T, match_by_order=True
        )
    with pytest.raises(ValueError, match="needs linen variables"):
        interop.torch_to_flax(sd, nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0))), match_by_order=True)


def test_rename_rules_apply_after_exact_names() -> None:
    model = randomized(TorchMLP())
    renamed = {k.replace("layers.", "backbone.blocks."): v for k, v in model.state_dict().items()}
    rules = {r"^backbone\.blocks\.": "layers."}
    variables = interop.torch_to_flax(renamed, MLP_T, rename=rules)
    back = interop.flax_to_torch(variables, renamed, rename=list(rules.items()))
    assert all(torch.equal(back[k], v) for k, v in renamed.items())
    with pytest.raises(ValueError, match="not a valid regex"):
        interop.torch_to_flax(renamed, MLP_T, rename={"(": "x"})
    with pytest.raises(TypeError, match="rename must be"):
        interop.torch_to_flax(renamed, MLP_T, rename=["abc"])


def test_every_problem_is_reported_at_once_sorted() -> None:
    sd = dict(randomized(TorchMLP()).state_dict())
    del sd["layers.0.bias"], sd["layers.2.weight"]
    sd["layers.1.weight"] = torch.zeros(5, 5)
    sd["layers.1.bias"] = sd["layers.1.bias"].double()
    sd["extra.b"], sd["extra.a"] = torch.zeros(1), torch.zeros(1)
    before = copy.deepcopy(sd)
    with pytest.raises(ValueError) as e:
        interop.torch_to_flax(sd, MLP_T)
    message = str(e.value)
    for expected in (
        "2 missing:\n  params/layers_0/bias (needs layers.0.bias)\n  params/layers_2/kernel",
        "2 unexpected:\n  extra.a\n  extra.b",
        "1 shapes:\n  layers.1.weight: (5, 5) in the state_dict, (16, 16)",
        "1 dtypes:\n  params/layers_1/bias: float64 in the state_dict, float32 in the template",
    ):
        assert expected in message
    assert all(torch.equal(before[k], v) for k, v in sd.items()) and list(before) == list(sd)


def test_non_strict_returns_value_and_report() -> None:
    sd = dict(randomized(TorchMLP()).state_dict())
    del sd["layers.0.bias"]
    concrete = LinenMLP().init(jax.random.key(0), X_MLP)
    result = interop.torch_to_flax(sd, concrete, strict=False)
    assert isinstance(result, interop.Converted)
    assert result.report.missing == ("params/layers_0/bias (needs layers.0.bias)",)
    assert not result.report.ok
    assert result.value["params"]["layers_0"]["bias"] is concrete["params"]["layers_0"]["bias"]
    kernel = result.value["params"]["layers_0"]["kernel"]
    np.testing.assert_array_equal(kernel, sd["layers.0.weight"].numpy().T)
    ok = interop.flax_to_torch(result.value, strict=False)
    assert ok.report.ok and str(ok.report) == "all keys matched"


def test_flax_to_torch_reports_against_the_template() -> None:
    params = jax.tree.map(np.asarray, LinenMLP().init(jax.random.key(0), X_MLP))
    del params["params"]["layers_2"]
    params["params"]["head"] = {"kernel": np.zeros((16, 3), np.float32)}
    with pytest.raises(ValueError) as e:
        interop.flax_to_torch(params, TorchMLP())
    assert "2 missing:\n  layers.2.bias\n  layers.2.weight" in str(e.value)
    assert "1 unexpected:\n  params/head/kernel" in str(e.value)
    result = interop.flax_to_torch(params, TorchMLP().double(), strict=False)
    assert len(result.report.dtypes) == 4 and list(result.value) == list(TorchMLP().state_dict())
    cast = interop.flax_to_torch(
        result.value and params, TorchMLP().double(), strict=False, cast=True
    )
    assert cast.report.dtypes == () and cast.value["layers.0.weight"].dtype == torch.float64


def test_float64_and_float16_round_trips_are_bit_exact() -> None:
    for dtype, np_dtype in ((torch.float64, np.float64), (torch.float16, np.float16)):
        model = randomized(TorchMLP()).to(dtype)
        template = jax.tree.map(lambda s, d=np_dtype: np.zeros(s.shape, d), MLP_T)
        variables = interop.torch_to_flax(model.state_dict(), template)
        leaf = variables["params"]["layers_0"]["kernel"]
        assert leaf.dtype == np_dtype  # float64 stays numpy while JAX's x64 is off
        back = interop.flax_to_torch(variables, model)
        assert all(
            torch.equal(back[k], v) and back[k].dtype == dtype
            for k, v in model.state_dict().items()
        )
    with pytest.raises(ValueError, match="pass cast=True"):
        interop.torch_to_flax(model.state_dict(), MLP_T)
    cast = interop.torch_to_flax(model.state_dict(), MLP_T, cast=True)
    assert cast["params"]["layers_0"]["kernel"].dtype == jnp.float32


def test_int64_buffers_survive_through_the_template() -> None:
    model = randomized(TorchCNN())
    bn = model.bn1
    bn.num_batches_tracked.fill_(2**40 + 3)
    template = interop.torch_to_flax(model.state_dict(), nnx.eval_shape(lambda: _nnx_cnn()))
    back = interop.flax_to_torch(template, model)
    assert back["bn1.num_batches_tracked"].dtype == torch.int64
    assert back["bn1.num_batches_tracked"].item() == 2**40 + 3
    default = interop.flax_to_torch(template)
    assert default["bn1.num_batches_tracked"].item() == 0


def _nnx_cnn():
    from tests.interop_models import NnxCNN

    return NnxCNN(nnx.Rngs(0))


def test_bad_inputs_are_type_errors() -> None:
    with pytest.raises(TypeError, match="expected linen variables"):
        interop.torch_to_flax(TorchMLP().state_dict(), [1, 2])
    with pytest.raises(TypeError, match="values must be tensors or arrays"):
        interop.torch_to_flax({"a": 1}, MLP_T)
    with pytest.raises(TypeError, match="torch_template must be"):
        interop.flax_to_torch(MLP_T, torch_template=3)
    with pytest.raises(
        ValueError, match="1 dtypes:\n  a: unsupported tensor dtype torch.complex32"
    ):
        with warnings.catch_warnings():  # complex32 is experimental
            warnings.simplefilter("ignore", UserWarning)
            complex32 = torch.zeros(1, dtype=torch.complex32)
        interop.torch_to_flax({"a": complex32}, {"params": {"a": np.zeros(1)}})


@pytest.mark.parametrize("empty", [{}, {"student": {}}])
def test_an_empty_template_is_called_empty(empty) -> None:
    for convert in (lambda: interop.torch_to_flax({}, empty), lambda: interop.flax_to_torch(empty)):
        with pytest.raises(TypeError) as e:
            convert()
        assert str(e.value).startswith(
            f"the Flax template (or variables) is empty, it holds no arrays: got {empty!r}. "
            "Pass linen variables {'params': ..., 'batch_stats': ...} (model.init(key, x)"
        )
        assert "got dict" not in str(e.value)


def test_state_dict_errors_name_the_type_and_a_few_keys_not_the_value() -> None:
    with pytest.raises(TypeError) as e:
        interop.torch_to_flax(TorchMLP(), MLP_T)
    assert str(e.value) == (
        "expected a state_dict (a mapping of names to tensors or arrays), got a TorchMLP; "
        "pass its .state_dict()"
    )
    with pytest.raises(TypeError) as e:
        interop.torch_to_flax([torch.zeros(3)] * 1000, MLP_T)
    assert (
        str(e.value)
        == "expected a state_dict (a mapping of names to tensors or arrays), got a list"
    )
    checkpoint = {"net": TorchMLP().state_dict(), "ema_net": {}, "epoch": 3}
    with pytest.raises(TypeError) as e:
        interop.torch_to_flax(checkpoint, MLP_T)
    assert str(e.value) == (
        "state_dict values must be tensors or arrays; 3 keys hold other values: 'ema_net', "
        "'epoch', 'net'; a whole checkpoint? pass checkpoint['ema_net']"
    )
    with pytest.raises(
        TypeError, match=r"100 keys .*: 'k0', 'k1', 'k10', 'k11', 'k12' and 95 more$"
    ):
        interop.torch_to_flax({f"k{i}": i for i in range(100)}, MLP_T)


def test_unknown_leaves_keep_their_names() -> None:
    class WithToken(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = tnn.Parameter(torch.randn(1, 4))

    model = WithToken()
    variables = interop.torch_to_flax(
        model.state_dict(), {"params": {"cls_token": np.zeros((1, 4), np.float32)}}
    )
    assert torch.equal(interop.flax_to_torch(variables, model)["cls_token"], model.cls_token.data)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"rename": {"a": "b"}}, "rename"),
        ({"match_by_order": True}, "match_by_order"),
        ({"rename": [], "match_by_order": True}, "rename and match_by_order"),
    ],
)
def test_flax_to_torch_refuses_pairing_options_it_would_ignore(kwargs, named) -> None:
    variables = LinenMLP().init(jax.random.key(0), X_MLP)
    with pytest.raises(ValueError) as e:
        interop.flax_to_torch(variables, **kwargs)
    assert str(e.value).startswith(f"flax_to_torch got {named} without a torch_template")
    assert "Pass torch_template=" in str(e.value)
    assert list(interop.flax_to_torch(variables)) == list(TorchMLP().state_dict())


PARAMETRIZED = ("parametrizations.weight.original0", "parametrizations.weight.original1")


def _weight_norm_conv(legacy: bool) -> torch.nn.Module:
    conv = torch.nn.Conv1d(2, 4, 3)
    if not legacy:
        return tnn.ModuleDict({"conv": torch.nn.utils.parametrizations.weight_norm(conv)})
    with pytest.warns(FutureWarning, match="is deprecated in favor of"):
        return tnn.ModuleDict({"conv": torch.nn.utils.weight_norm(conv)})


@pytest.mark.parametrize("flax_spelling", ["weight_g", "parametrizations"])
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "weight_g"])
def test_weight_norm_loads_and_saves_under_either_spelling(legacy, flax_spelling) -> None:
    """``parametrizations.weight.original0/1`` and the legacy ``weight_g``/``weight_v`` are one
    layout: either PyTorch spelling fills a Flax tree that uses either, and goes back."""
    conv = randomized(_weight_norm_conv(legacy))
    state_dict = conv.state_dict()
    torch_g, torch_v = ("weight_g", "weight_v") if legacy else PARAMETRIZED
    flax_g, flax_v = ("weight_g", "weight_v") if flax_spelling == "weight_g" else PARAMETRIZED
    g, v = (state_dict[f"conv.{name}"].numpy() for name in (torch_g, torch_v))
    leaves = {flax_g: np.zeros_like(g), flax_v: np.zeros_like(v), "bias": np.zeros(4, np.float32)}
    template = {"params": {"conv": traverse_util.unflatten_dict(leaves, sep=".")}}
    variables = interop.torch_to_flax(state_dict, template)
    flat = traverse_util.flatten_dict(variables["params"]["conv"], sep=".")
    np.testing.assert_array_equal(flat[flax_g], g)
    np.testing.assert_array_equal(flat[flax_v], v)
    back = interop.flax_to_torch(variables, conv)
    assert list(back) == list(state_dict)
    assert all(torch.equal(back[k], state_dict[k]) for k in state_dict)
    assert list(interop.flax_to_torch(variables))[:2] == [f"conv.{flax_g}", f"conv.{flax_v}"]


def test_a_unit_that_finds_part_of_its_keys_says_what_it_lacks_and_what_it_found() -> None:
    model = randomized(TorchAttention())
    state_dict = {k: v for k, v in model.state_dict().items() if k != "attn.in_proj_bias"}
    template = jax.eval_shape(LinenAttention().init, jax.random.key(0), np.zeros((2, 6), int))
    report = interop.torch_to_flax(state_dict, template, strict=False).report
    found = "attn.in_proj_weight, attn.out_proj.weight, attn.out_proj.bias"
    assert report.missing[0] == (
        f"params/attn/key/bias (needs attn.in_proj_bias; {found} are there but load only with it)"
    )
    assert len(report.missing) == 8
    assert report.unexpected == (
        "attn.in_proj_weight",
        "attn.out_proj.bias",
        "attn.out_proj.weight",
    )


def test_a_key_read_under_another_name_or_taken_by_another_leaf_is_explained() -> None:
    """A Flax model whose top module is called ``module``: PyTorch's keys all start with
    ``module.``, which is dropped as DataParallel's prefix. And two leaves wanting one key."""
    template = {"params": {"module": {"fc": {"bias": np.zeros(3, np.float32)}}}}
    report = interop.torch_to_flax({"module.fc.bias": torch.ones(3)}, template, strict=False).report
    assert report.missing == (
        "params/module/fc/bias (needs module.fc.bias; the state_dict's module.fc.bias is read as "
        "fc.bias)",
    )
    assert report.unexpected == ("module.fc.bias",)
    fixed = interop.torch_to_flax(
        {"module.fc.bias": torch.ones(3)}, template, rename={"^": "module."}
    )
    np.testing.assert_array_equal(fixed["params"]["module"]["fc"]["bias"], np.ones(3))
    both = {
        "params": {"m": {"kernel": np.zeros((3, 3), np.float32), "scale": np.zeros(3, np.float32)}}
    }
    report = interop.torch_to_flax({"m.weight": torch.ones(3, 3)}, both, strict=False).report
    assert report.missing == ("params/m/scale (needs m.weight; m.weight went to params/m/kernel)",)
