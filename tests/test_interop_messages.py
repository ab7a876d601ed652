"""Messages that fit the problem: hints that can help, a sorted template refused for
``match_by_order``, a missing checkpoint file named. No PyTorch: state_dicts are numpy arrays
with PyTorch's names, shapes and registration order."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

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
        "(6,): the dict keys of the template are in sorted order at every level, as "
        "jax.eval_shape and jax.jit return them, not in the order the model first calls its "
        "modules, which is PyTorch's order. Pass an eager template, model.init(key, x) (any "
        "values of the right shapes); or pair by name with rename={pattern: replacement}"
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
    initialised = jax.jit(AutoNamed().init)(jax.random.key(0), X)  # a jit output: sorted keys
    variables = jax.tree.map(lambda a: _normal(*a.shape), initialised)  # tree.map sorts too
    path = tmp_path / "ckpt.pth"
    message = _message(
        lambda: interop.save_checkpoint(
            path, net=variables, torch_template=TORCH_CONV_BN, match_by_order=True
        )
    )
    assert message.startswith(
        "match_by_order=True paired conv.weight (6, 3, 3, 3) with batch_stats/BatchNorm_0/mean "
        "(6,): the dict keys of the variables are in sorted order at every level"
    )
    assert message.endswith(
        "Put them in an eager init's order: with flatten_dict and unflatten_dict from "
        "flax.traverse_util and flat = flatten_dict(variables), pass unflatten_dict({path: "
        "flat[path] for path in flatten_dict(model.init(key, x))}); or pair by name with "
        "rename={pattern: replacement}"
    )
    assert not path.exists()
    flat = flatten_dict(variables)  # the fix the message gives
    eager = flatten_dict(AutoNamed().init(jax.random.key(0), X))
    reordered = unflatten_dict({leaf: flat[leaf] for leaf in eager})
    interop.save_checkpoint(path, net=reordered, torch_template=TORCH_CONV_BN, match_by_order=True)
    net = interop.read_checkpoint(path)["net"]
    params, stats = variables["params"], variables["batch_stats"]["BatchNorm_0"]
    np.testing.assert_array_equal(
        net["conv.weight"], np.transpose(params["Conv_0"]["kernel"], (3, 2, 0, 1))
    )
    for key, value in (
        ("conv.bias", params["Conv_0"]["bias"]),
        ("bn.weight", params["BatchNorm_0"]["scale"]),
        ("bn.bias", params["BatchNorm_0"]["bias"]),
        ("bn.running_mean", stats["mean"]),
        ("bn.running_var", stats["var"]),
    ):
        np.testing.assert_array_equal(net[key], value)


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


@pytest.mark.parametrize(
    ("kernel", "rule"),
    [
        ((3, 2, 5), "a Conv kernel (k, I/g, O) is a Conv1d weight (O, I/g, k)"),
        (
            (1, 3, 3, 2, 5),
            "a Conv kernel (kd, kh, kw, I/g, O) is a Conv3d weight (O, I/g, kd, kh, kw)",
        ),
    ],
)
def test_conv1d_and_conv3d_mismatches_name_their_layout(kernel, rule) -> None:
    template = {"params": {"conv": {"kernel": np.zeros(kernel, np.float32)}}}
    torch_side = {"conv.weight": np.zeros((5, 7, *kernel[:-2]), np.float32)}
    message = _message(lambda: interop.torch_to_flax(torch_side, template))
    assert f"for params/conv/kernel {kernel}: {rule}\n" in message


def test_an_attention_mismatch_names_the_packed_layout() -> None:
    e, heads = 4, 2
    parts = {p: {"kernel": np.zeros((e, heads, e // heads)), "bias": np.zeros((heads, e // heads))}
             for p in ("query", "key", "value")}  # fmt: skip
    parts["out"] = {"kernel": np.zeros((heads, e // heads, e)), "bias": np.zeros(e)}
    template = {"params": {"attn": parts}}
    torch_side = {
        "attn.in_proj_weight": np.zeros((3 * e + 3, e)),
        "attn.in_proj_bias": np.zeros(3 * e),
        "attn.out_proj.weight": np.zeros((e, e)),
        "attn.out_proj.bias": np.zeros(e),
    }
    message = _message(lambda: interop.torch_to_flax(torch_side, template))
    assert (
        "  attn.in_proj_weight: (15, 4) in the state_dict, (12, 4) for params/attn/query/kernel: "
        "query/key/value kernels (E, H, D) are in_proj_weight (3E, E) in three, transposed; out "
        "(H, D, E) is out_proj.weight (E, E) transposed\nNames match where shapes differ"
    ) in message


def test_match_by_order_on_a_sorted_file_or_folder_is_refused(tmp_path):
    net = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32)}}}
    file, folder = tmp_path / "ckpt.safetensors", f"{tmp_path}/hf/"
    interop.save_checkpoint(file, net=net)
    interop.save_checkpoint(folder, net=net)
    for path in (file, folder):
        with pytest.raises(ValueError, match="keeps its keys sorted .* pass rename="):
            interop.load_checkpoint(path, net, match_by_order=True)
    with pytest.raises(FileNotFoundError):
        interop.load_checkpoint(tmp_path / "none.safetensors", net, match_by_order=True)
