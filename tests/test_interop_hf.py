"""Hugging Face folders against transformers v4 itself: folders ``save_pretrained`` writes
(sharded at 200KB, both formats) load into the Flax classes with the defaults and give
PyTorch's outputs; folders ``save_checkpoint`` writes load in ``from_pretrained`` with no
missing or unexpected keys, bit-exact, and have the index ``save_pretrained`` writes; shard
sizes parse as transformers parses them."""

from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.utils.hub import convert_file_size_to_int

import interop
from interop._hf import shard_size
from tests.test_interop_transformers import _bits, _forward

CONFIGS = {  # large enough for several 200KB shards, small enough to stay fast
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 1000, "n_positions": 64},
    ),
    "bert": (
        "BertConfig",
        "BertForMaskedLM",
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
        | {"intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 64},
    ),
}
INDEX = {True: "model.safetensors.index.json", False: "pytorch_model.bin.index.json"}
SINGLE = {True: "model.safetensors", False: "pytorch_model.bin"}


@functools.cache
def _model(name: str) -> torch.nn.Module:
    config_class, model_class, settings = CONFIGS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**settings)
    return getattr(transformers, model_class)(config).eval()


@functools.cache
def _flax(name: str) -> tuple[object, dict]:
    model = _model(name)
    flax = getattr(transformers, "Flax" + type(model).__name__)(model.config, _do_init=False)
    shapes = jax.eval_shape(lambda: flax.init_weights(jax.random.PRNGKey(0), flax.input_shape))
    return flax, {"params": shapes}


@functools.cache
def _pretrained(name: str, safe: bool, sharded: bool, root: str) -> str:
    folder = os.path.join(root, f"{name}-{safe}-{sharded}")
    size = "200KB" if sharded else "5GB"
    _model(name).save_pretrained(folder, max_shard_size=size, safe_serialization=safe)
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf"))


def _outputs(name: str, variables: dict) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).integers(3, 1000, (2, 7))
    with torch.no_grad():
        want = _model(name)(torch.from_numpy(x)).logits.numpy()
    flax, _ = _flax(name)
    return np.asarray(_forward(flax, "logits")(variables["params"], {"input_ids": x})), want


@pytest.mark.parametrize("index", [False, True], ids=["folder", "index_path"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("name", CONFIGS)
def test_save_pretrained_shards_load_into_the_flax_class(name, safe, index, root) -> None:
    folder = _pretrained(name, safe, True, root)
    shards = [f for f in os.listdir(folder) if "-of-" in f]
    assert len(shards) >= 3 and os.path.isfile(os.path.join(folder, INDEX[safe]))
    path = os.path.join(folder, INDEX[safe]) if index else folder
    got, want = _outputs(name, interop.load_checkpoint(path, _flax(name)[1]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_a_single_weights_file_in_a_folder_loads(safe, root) -> None:
    folder = _pretrained("gpt2", safe, False, root)
    assert SINGLE[safe] in os.listdir(folder) and INDEX[safe] not in os.listdir(folder)
    got, want = _outputs("gpt2", interop.load_checkpoint(folder, _flax("gpt2")[1]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_loaded_folder_stays_memory_mapped(root) -> None:
    folder = _pretrained("bert", True, True, root)
    state_dict = interop.read_checkpoint(folder)
    with open(os.path.join(folder, INDEX[True])) as f:
        assert set(state_dict) == set(json.load(f)["weight_map"])
    assert len(state_dict) == len(_model("bert").state_dict()) - 2  # two tied keys left out
    assert all(not a.flags.writeable and not a.flags.owndata for a in state_dict.values())


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("name", CONFIGS)
def test_save_checkpoint_folders_load_in_from_pretrained(name, safe, sharded, root) -> None:
    model = _model(name)
    variables = interop.load_checkpoint(_pretrained(name, True, True, root), _flax(name)[1])
    folder = os.path.join(root, f"ours-{name}-{safe}-{sharded}") + os.sep
    interop.save_checkpoint(
        folder,
        net=variables,
        torch_template=type(model)(model.config),
        format="safetensors" if safe else "pth",
        max_shard_size="200KB" if sharded else "5GB",
    )
    theirs = _pretrained(name, safe, sharded, root)
    ours_files = sorted(os.listdir(folder))
    assert ours_files == sorted(f for f in os.listdir(theirs) if not f.endswith("config.json"))
    if sharded:
        with open(os.path.join(folder, INDEX[safe])) as f:
            ours = json.load(f)
        with open(os.path.join(theirs, INDEX[safe])) as f:
            want = json.load(f)
        assert ours["weight_map"] == want["weight_map"]  # the same split, tied keys alike
        assert ours["metadata"]["total_size"] == want["metadata"]["total_size"]
    model.config.save_pretrained(folder)
    loaded, info = type(model).from_pretrained(folder, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []} | {
        "error_msgs": []
    }
    for key, tensor in model.state_dict().items():
        other = loaded.state_dict()[key]
        assert other.dtype == tensor.dtype and _bits(other) == _bits(tensor), key


def test_tied_keys_are_written_as_save_pretrained_writes_them(root) -> None:
    """safetensors: ``lm_head.weight`` left out (``from_pretrained`` ties it); ``.bin``: kept,
    one storage with the embedding."""
    variables = interop.load_checkpoint(_pretrained("gpt2", True, True, root), _flax("gpt2")[1])
    for safe in (True, False):
        folder = os.path.join(root, f"tied-{safe}") + os.sep
        interop.save_checkpoint(
            folder, net=variables, torch_template=_model("gpt2"), format=None if safe else "pth"
        )
        file = os.path.join(folder, SINGLE[safe])
        if safe:
            keys = interop.read_checkpoint(file).keys()
            assert "lm_head.weight" not in keys and "transformer.wte.weight" in keys
        else:
            state_dict = torch.load(file, weights_only=True)
            head, wte = state_dict["lm_head.weight"], state_dict["transformer.wte.weight"]
            assert head.untyped_storage().data_ptr() == wte.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "size",
    [1, 12345, "5GB", "200KB", "3MB", "1GiB", "7MiB", "9KiB", "5Gb", "8Kb", "40mb", "2kB"]
    + ["5 GB", " 5GB", "2 MiB", "3\tKB"],
)
def test_shard_sizes_parse_as_transformers_parses_them(size) -> None:
    assert shard_size(size) == convert_file_size_to_int(size)


@pytest.mark.parametrize("size", ["5", "1.5GB", "GB", " GB", "-3MB", "5TB", "5 T B", 0, -1])
def test_sizes_transformers_cannot_parse_are_refused(size) -> None:
    with pytest.raises(ValueError, match="max_shard_size must be a positive"):
        shard_size(size)
