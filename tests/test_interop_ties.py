"""Tied weights and PyTorch-only tensors: loaded once or left out, named in the report, and
written from the right source when saving, so a strict ``load_state_dict`` gives the model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn as tnn

import interop
from tests.interop_models import LinenTiedLM, TorchTiedLM, randomized

TOKENS = np.arange(12).reshape(2, 6) % 20
TEMPLATE = jax.eval_shape(LinenTiedLM().init, jax.random.key(0), TOKENS)
NOTES = {
    "tied": ("head.weight: tied to embed.weight (same tensor)",),
    "torch_only": ("position_ids", "positions"),
}


def _random_flax(seed: int = 1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), TEMPLATE)


def _outputs(model: tnn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).numpy()


def test_a_tied_alias_and_torch_only_buffers_load_strictly_and_are_named() -> None:
    model = randomized(TorchTiedLM())
    variables = interop.torch_to_flax(model.state_dict(), TEMPLATE)
    np.testing.assert_allclose(
        LinenTiedLM().apply(variables, TOKENS), _outputs(model), rtol=1e-5, atol=1e-5
    )
    report = interop.torch_to_flax(model.state_dict(), TEMPLATE, strict=False).report
    assert (report.tied, report.torch_only) == (NOTES["tied"], NOTES["torch_only"])
    assert report.ok and str(report).startswith("1 tied:\n  head.weight: tied to embed.weight")


def test_the_alias_is_written_from_its_source_not_the_templates_stale_value() -> None:
    """The regression: a fresh model as template, then a strict ``load_state_dict``."""
    variables = _random_flax()
    fresh = TorchTiedLM()
    state_dict = interop.flax_to_torch(variables, fresh)
    assert torch.equal(state_dict["head.weight"], state_dict["embed.weight"])
    fresh.load_state_dict(state_dict, strict=True)
    embedding = variables["params"]["embed"]["embedding"]
    np.testing.assert_array_equal(fresh.embed.weight.detach().numpy(), embedding)
    np.testing.assert_allclose(
        _outputs(fresh), LinenTiedLM().apply(variables, TOKENS), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(state_dict["positions"], TorchTiedLM().positions)
    assert interop.flax_to_torch(variables, fresh, strict=False).report.tied == NOTES["tied"]


def test_saved_files_keep_the_tie_and_a_file_that_lost_it_loads_by_equal_values(tmp_path) -> None:
    variables = _random_flax()
    for suffix in ("pth", "safetensors"):
        path = tmp_path / f"tied.{suffix}"
        interop.save_checkpoint(path, net=variables, torch_template=TorchTiedLM())
        if suffix == "pth":
            net = torch.load(path, weights_only=True)["net"]
            assert net["head.weight"].data_ptr() == net["embed.weight"].data_ptr()
        else:
            keys = {f"net.{k}" for k in TorchTiedLM().state_dict()}
            assert set(safetensors.torch.load_file(path)) == keys
        result = interop.load_checkpoint(path, TEMPLATE, strict=False)
        assert result.report.ok and result.report.tied == NOTES["tied"]
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, result.value, variables)))
    lost = {k: v.clone() for k, v in interop.flax_to_torch(variables, TorchTiedLM()).items()}
    safetensors.torch.save_file(lost, tmp_path / "lost.safetensors")
    report = interop.load_checkpoint(tmp_path / "lost.safetensors", TEMPLATE, strict=False).report
    assert report.ok and report.tied == ("head.weight: tied to embed.weight (equal values)",)


def test_tied_keys_given_different_values_are_a_conflict() -> None:
    """A Flax model with its own head, saved into a template that ties it to the embedding."""
    variables = _random_flax()
    untied = {"params": {**variables["params"], "head": {"kernel": np.ones((16, 20), np.float32)}}}
    with pytest.raises(ValueError) as e:
        interop.flax_to_torch(untied, TorchTiedLM())
    assert (
        "1 conflicts:\n  embed.weight, head.weight: one tensor in the template (tied), different "
        "values from Flax"
    ) in str(e.value)
    same = {
        "params": {
            **untied["params"],
            "head": {"kernel": variables["params"]["embed"]["embedding"].T},
        }
    }
    assert interop.flax_to_torch(same, TorchTiedLM(), strict=False).report.ok


def test_constants_are_not_taken_for_ties_and_unknown_tensors_stay_errors() -> None:
    """Equal values tie keys only when the values vary: a second LayerNorm's ones are not an
    alias of the first's. A parameter the Flax side lacks stays unexpected or missing."""
    model = TorchTiedLM()
    extra = {"extra_norm.weight": torch.ones(16), "extra_norm.bias": torch.zeros(16)}
    extra["extra.weight"] = torch.randn(3, 3)
    result = interop.torch_to_flax({**model.state_dict(), **extra}, TEMPLATE, strict=False)
    assert result.report.unexpected == tuple(sorted(extra))
    model.extra = tnn.Linear(3, 3)
    report = interop.flax_to_torch(_random_flax(), model, strict=False).report
    assert report.missing == ("extra.bias", "extra.weight")
    assert report.torch_only == NOTES["torch_only"]


def test_buffers_are_torch_only_with_a_module_template_only_when_no_layout_claims_them() -> None:
    """A module's buffer (here a float ``scale`` table) is taken from the template; with a
    state_dict for template it could be anything, so it must be matched; BatchNorm statistics
    have Flax twins, so a Flax side without them is an error, not a silent fresh value."""
    model = TorchTiedLM()
    model.register_buffer("scale", torch.rand(4))
    report = interop.flax_to_torch(_random_flax(), model, strict=False).report
    assert report.torch_only == ("position_ids", "positions", "scale") and report.ok
    by_state_dict = interop.flax_to_torch(_random_flax(), model.state_dict(), strict=False)
    assert by_state_dict.report.missing == ("scale",)
    model.bn = tnn.BatchNorm1d(4)
    report = interop.flax_to_torch(_random_flax(), model, strict=False).report
    assert report.missing == ("bn.bias", "bn.running_mean", "bn.running_var", "bn.weight")
    assert report.torch_only[-1] == "scale" and "bn.num_batches_tracked" in report.torch_only


def test_leftovers_without_dense_data_are_unexpected_not_a_crash() -> None:
    state_dict = {**TorchTiedLM().state_dict(), "meta": torch.empty(2, device="meta")}
    state_dict["sparse"] = torch.ones(3).to_sparse()
    state_dict["empty_table"] = torch.zeros(5, 0)
    report = interop.torch_to_flax(state_dict, TEMPLATE, strict=False).report
    assert report.unexpected == ("empty_table", "meta", "sparse")


def test_our_safetensors_files_record_ties_so_constant_ones_load_strictly(tmp_path) -> None:
    """A tie of all-equal values (a fresh zero bias) is no evidence by value; interop's own
    safetensors files name their ties (``jema.tied``), so they read back as one tensor."""
    variables = _random_flax()
    variables["params"]["embed"]["embedding"] = np.zeros((20, 16), np.float32)
    path = tmp_path / "tied.safetensors"
    interop.save_checkpoint(path, net=variables, torch_template=TorchTiedLM())
    report = interop.load_checkpoint(path, TEMPLATE, strict=False).report
    assert report.ok and report.tied == NOTES["tied"]
    flat = safetensors.torch.load_file(path)
    flat["net.head.weight"] = torch.ones(20, 16)  # the record no longer holds: not a tie
    safetensors.torch.save_file(
        flat,
        path,
        metadata={"jema.tied": '{"net.head.weight": "net.embed.weight"}', "jema.sections": "net"},
    )
    assert interop.load_checkpoint(path, TEMPLATE, strict=False).report.unexpected == (
        "head.weight",
    )
    safetensors.torch.save_file(flat, path, metadata={"jema.tied": "[1]"})
    with pytest.raises(
        ValueError, match="metadata 'jema.tied' must be a JSON object of key -> key"
    ):
        interop.load_checkpoint(path, TEMPLATE)
