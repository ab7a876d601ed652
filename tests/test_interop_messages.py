"""Messages that fit the problem: hints that can help, a sorted template refused for
``match_by_order``, a missing checkpoint file named. No PyTorch: state_dicts are numpy arrays
with PyTorch's names, shapes and registration order."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interop

RNG = np.random.default_rng(0)


def _normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


class AutoNamed(nn.Module):
    """A conv + batchnorm model with linen's automatic names (Conv_0, BatchNorm_0)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)))(x)
        return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5)(x)


X = jnp.zeros((1, 8, 8, 3))
# torch: self.conv = nn.Conv2d(3, 6, 3, padding=1); self.bn = nn.BatchNorm2d(6)
TORCH_CONV_BN = {
    "conv.weight": _normal(6, 3, 3, 3),
    "conv.bias": _normal(6),
    "bn.weight": _normal(6),
    "bn.bias": _normal(6),
    "bn.running_mean": _normal(6),
    "bn.running_var": np.abs(_normal(6)) + 0.5,
    "bn.num_batches_tracked": np.array(0, np.int64),
}


def _message(call) -> str:
    with pytest.raises(ValueError) as e:
        call()
    return str(e.value)


def test_a_shape_mismatch_names_the_shapes_and_the_layout_rule_not_rename() -> None:
    template = {"params": {"conv": {"kernel": np.zeros((3, 3, 1, 6), np.float32)}}}
    message = _message(
        lambda: interop.torch_to_flax({"conv.weight": _normal(6, 3, 3, 3)}, template)
    )
    assert message == (
        "the state_dict does not match:\n1 shapes:\n"
        "  conv.weight: (6, 3, 3, 3) in the state_dict, (6, 1, 3, 3) for params/conv/kernel "
        "(3, 3, 1, 6): a Conv kernel (kh, kw, I/g, O) is a Conv2d weight (O, I/g, kh, kw)\n"
        "Names match where shapes differ: build the Flax modules with PyTorch's sizes "
        "(features, kernel size, groups, heads). Or pass strict=False to get the rest with this "
        "report."
    )


def test_a_dense_shape_mismatch_both_ways_says_how_linear_weights_are_laid_out(tmp_path) -> None:
    dense = {"params": {"fc": {"kernel": np.zeros((5, 3), np.float32), "bias": np.zeros(3)}}}
    torch_side = {"fc.weight": _normal(3, 4), "fc.bias": np.zeros(3)}
    loading = _message(lambda: interop.torch_to_flax(torch_side, dense))
    assert (
        "fc.weight: (3, 4) in the state_dict, (3, 5) for params/fc/kernel (5, 3): a Dense "
        in loading
    )
    assert "kernel (I, O) is a Linear weight (O, I)\n" in loading
    saving = _message(
        lambda: interop.save_checkpoint(tmp_path / "x.pth", net=dense, torch_template=torch_side)
    )
    assert (
        "  fc.weight: (3, 5) from Flax, (3, 4) in template; params/fc/kernel (5, 3): a Dense "
        in saving
    )
    for message in (loading, saving):
        assert "Names match where shapes differ" in message
        assert "rename" not in message and "match_by_order" not in message


def test_a_bias_shape_mismatch_has_no_layout_rule_to_name() -> None:
    template = {"params": {"fc": {"bias": np.zeros(2, np.float32)}}}
    message = _message(
        lambda: interop.torch_to_flax({"fc.bias": np.zeros(3, np.float32)}, template)
    )
    assert "  fc.bias: (3,) in the state_dict, (2,) for params/fc/bias\nNames match" in message


def test_name_mismatches_get_the_rename_hint() -> None:
    template = {"params": {"head": {"kernel": np.zeros((4, 3), np.float32)}}}
    message = _message(lambda: interop.torch_to_flax({"fc.weight": _normal(3, 4)}, template))
    assert message == (
        "the state_dict does not match:\n"
        "1 missing:\n  params/head/kernel (needs head.weight)\n1 unexpected:\n  fc.weight\n"
        "Names differ: pass rename={pattern: replacement} (regex rules turning PyTorch names "
        "into the Flax side's default names, e.g. {r'^backbone\\.': ''}), or match_by_order=True "
        "for linen variables from an eager model.init. Or pass strict=False to get the rest "
        "with this report."
    )
    renamed = interop.torch_to_flax({"fc.weight": _normal(3, 4)}, template, rename={"^fc": "head"})
    assert renamed["params"]["head"]["kernel"].shape == (4, 3)


def test_a_dtype_mismatch_gets_cast_on_its_line_and_no_rename() -> None:
    template = {"params": {"fc": {"bias": np.zeros(2, np.float32)}}}
    message = _message(lambda: interop.torch_to_flax({"fc.bias": np.zeros(2)}, template))
    assert message.endswith(
        "float64 in the state_dict, float32 in the template (pass cast=True to convert)\n"
        "Pass strict=False to get the rest with this report."
    )


def test_match_by_order_refuses_a_sorted_template_naming_a_pair() -> None:
    template = jax.eval_shape(AutoNamed().init, jax.random.key(0), X)  # the README's way
    message = _message(lambda: interop.torch_to_flax(TORCH_CONV_BN, template, match_by_order=True))
    assert message == (
        "match_by_order=True paired conv.weight (6, 3, 3, 3) with batch_stats/BatchNorm_0/mean "
        "(6,): the template's dict keys are in sorted order at every level, as jax.eval_shape "
        "and jax.jit return them, not in the order the model first calls its modules, which is "
        "PyTorch's order. Pass an eager template, model.init(key, x) (values can be any arrays "
        "of the right shapes), or pair by name with rename={pattern: replacement}"
    )
    with pytest.raises(ValueError, match="match_by_order=True paired conv.weight"):
        interop.torch_to_flax(TORCH_CONV_BN, template, match_by_order=True, strict=False)


def test_match_by_order_with_an_eager_template_pairs_each_tensor_with_its_leaf() -> None:
    template = AutoNamed().init(jax.random.key(0), X)
    variables = interop.torch_to_flax(TORCH_CONV_BN, template, match_by_order=True)
    kernel = variables["params"]["Conv_0"]["kernel"]
    np.testing.assert_array_equal(kernel, TORCH_CONV_BN["conv.weight"].transpose(2, 3, 1, 0))
    stats = variables["batch_stats"]["BatchNorm_0"]
    np.testing.assert_array_equal(stats["var"], TORCH_CONV_BN["bn.running_var"])
    np.testing.assert_array_equal(stats["mean"], TORCH_CONV_BN["bn.running_mean"])


def test_match_by_order_refuses_sorted_variables_when_saving(tmp_path) -> None:
    variables = jax.jit(AutoNamed().init)(jax.random.key(0), X)  # a jit output: sorted keys
    path = tmp_path / "ckpt.pth"
    message = _message(
        lambda: interop.save_checkpoint(
            path, net=variables, torch_template=TORCH_CONV_BN, match_by_order=True
        )
    )
    assert message.startswith(
        "match_by_order=True paired conv.weight (6, 3, 3, 3) with batch_stats/BatchNorm_0/mean "
        "(6,): the variables' dict keys are in sorted order at every level"
    )
    assert not path.exists()


def test_a_sorted_template_whose_order_fits_the_shapes_still_pairs_by_order() -> None:
    # Sorted at every level (no bias), as an eager init of two bias-free Dense layers is; the
    # PyTorch keys are not sorted (stem before head), and every pair made by order fits.
    template = {
        "params": {
            "Dense_0": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
            "Dense_1": {"kernel": jax.ShapeDtypeStruct((8, 3), jnp.float32)},
        }
    }
    torch_side = {"stem.weight": _normal(8, 4), "head.weight": _normal(3, 8)}
    variables = interop.torch_to_flax(torch_side, template, match_by_order=True)
    np.testing.assert_array_equal(
        variables["params"]["Dense_0"]["kernel"], torch_side["stem.weight"].T
    )
    np.testing.assert_array_equal(
        variables["params"]["Dense_1"]["kernel"], torch_side["head.weight"].T
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda path: interop.load_checkpoint(path, {"params": {"fc": {"bias": np.zeros(2)}}}),
        lambda path: interop.read_checkpoint(path),
        lambda path: interop.inspect_checkpoint(path),
        lambda path: interop.save_checkpoint(
            path.with_name("out.pth"), net={"params": {"fc": {"bias": np.zeros(2)}}},
            torch_template=path,
        ),
    ],
    ids=["load_checkpoint", "read_checkpoint", "inspect_checkpoint", "save_checkpoint template"],
)  # fmt: skip
def test_a_missing_checkpoint_file_is_named_with_what_is_expected(tmp_path, call) -> None:
    path = tmp_path / "ckpt_best.pth"
    with pytest.raises(FileNotFoundError) as e:
        call(path)
    assert e.value.filename == str(path)
    assert str(e.value) == (
        "[Errno 2] No such file: expected a checkpoint there, a torch.save file (.pth: "
        "SuperGradients' ckpt_best.pth, a state_dict) or a safetensors file, as save_checkpoint "
        f"writes either: '{path}'"
    )
