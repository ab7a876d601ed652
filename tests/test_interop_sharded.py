"""Models nobody here wrote, loaded into sharded templates on 8 CPU devices.

transformers v4's BERT (embeddings, Linear -> Dense kernels transposed, LayerNorm) and ResNet
(Conv kernels, BatchNorm scale/bias and batch_stats) with random weights, saved by PyTorch as a
zip ``.pth``, a legacy ``.pth`` and a safetensors file, load into their Flax classes' templates
with a ``NamedSharding`` on every leaf, one of six PartitionSpec patterns on a 2x4 mesh: every
leaf comes back with exactly the template's sharding, each device holding only its shard, the
bits those of an unsharded load, and saved back as PyTorch's own tensors. The loads run in
``tests/sharded_load_checks.py`` (a fresh process with 8 devices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from tests.sharded_load_checks import PATTERNS

transformers = pytest.importorskip("transformers")

SCRIPT = Path(__file__).with_name("sharded_load_checks.py")
CONFIG = {
    "bert": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "vocab_size": 48,
        "max_position_embeddings": 20,  # divisible by 4, not 8: the rows split over 'y' only
    },
    "resnet": {"embedding_size": 16, "hidden_sizes": [32, 64], "depths": [1, 1]},
}
MODELS = {"bert": "BertModel", "resnet": "ResNetModel"}
FILES = ("zip.pth", "model.safetensors", "legacy.pth")


def torch_model(name: str) -> torch.nn.Module:
    """The model with random weights, BatchNorm statistics included."""
    torch.manual_seed(0)
    config = getattr(transformers, MODELS[name].replace("Model", "Config"))(**CONFIG[name])
    model = getattr(transformers, MODELS[name])(config).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> tuple[Path, dict[str, Any], dict[str, torch.nn.Module]]:
    """The folder, the facts printed by the checks script, and the PyTorch models."""
    folder = tmp_path_factory.mktemp("sharded")
    models = {name: torch_model(name) for name in MODELS}
    for name, model in models.items():
        state_dict = model.state_dict()
        torch.save(state_dict, folder / f"{name}_zip.pth")
        torch.save(state_dict, folder / f"{name}_legacy.pth", _use_new_zipfile_serialization=False)
        safetensors.torch.save_file(state_dict, folder / f"{name}_model.safetensors")
    cases = [{"name": n, "template": n, "files": [f"{n}_{f}" for f in FILES]} for n in MODELS]
    (folder / "plan.json").write_text(json.dumps({"cases": cases, "config": CONFIG}))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return folder, json.loads(done.stdout.strip().splitlines()[-1]), models


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("name", MODELS)
def test_every_leaf_has_the_templates_sharding_and_the_unsharded_bits(loaded, name, file, pattern):
    _, facts, _ = loaded
    assert facts["devices"] == 8
    load = facts[f"{name}/{name}_{file}/{pattern}"]
    assert load["wrong"] == []
    split = [path for path, (_, parts) in load["specs"].items() if any(parts)]
    if pattern == "replicated":
        assert split == []
    else:
        assert len(split) >= len(load["specs"]) // 2, load["specs"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", MODELS)
def test_sharded_loads_save_back_as_pytorchs_own_tensors(loaded, name, pattern):
    folder, _, models = loaded
    back = safetensors.torch.load_file(folder / f"back_{name}_{pattern}.safetensors")
    want = models[name].state_dict()
    back = {k.removeprefix("net."): v for k, v in back.items()}
    assert sorted(back) == sorted(want)
    for key, tensor in want.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_the_patterns_split_every_kind_of_leaf_on_each_axis(loaded):
    _, facts, _ = loaded
    seen = set()  # (leaf name, ndim, dim, mesh axes) of every split dim
    for key, load in facts.items():
        for path, (shape, parts) in load["specs"].items() if key != "devices" else ():
            name = path.split("'")[-2]
            seen |= {(name, len(shape), dim, axes) for dim, axes in enumerate(parts) if axes}
    for name, ndim in [("kernel", 2), ("kernel", 4), ("embedding", 2)]:
        for axes in ("x", "y", "x+y"):
            assert {(name, ndim, dim, axes) for dim in range(ndim)} & seen, (name, ndim, axes)
        # Both ways round: the axis PyTorch's rows run along (a kernel's O, last) and one its
        # columns do (I: a Dense kernel's first, a Conv kernel's third).
        for dim in (0 if ndim == 2 else ndim - 2, ndim - 1):
            assert {(name, ndim, dim, axes) for axes in ("x", "y", "x+y")} & seen, (name, dim)
    for name in ("scale", "bias", "mean", "var"):
        assert {(name, 1, 0, axes) for axes in ("x", "y", "x+y")} <= seen, name
    # BERT's 20 positions split 4 ways, not 8: that dim falls back to 'y' alone.
    assert ("embedding", 2, 0, "y") in seen
