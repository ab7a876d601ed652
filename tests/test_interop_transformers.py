"""Models nobody here wrote: transformers v4 ships a PyTorch and a Flax class for each family.

Small random configs, no downloads. For each family, a SuperGradients checkpoint of the PyTorch
model (``net`` and a different ``ema_net``) loads with the defaults, strictly, into the Flax
model's parameters and gives PyTorch's outputs; and the Flax values saved back with the PyTorch
model as template load into it with a strict ``load_state_dict``, bit-exact. Between them the
families cover tied embeddings (GPT-2, BERT, BART), layer-scale names ending in digits (BEiT's
``lambda_1``), weight norm (Wav2Vec2), BatchNorm (ResNet) and a sinusoidal position table that
only PyTorch stores (Pegasus).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

import interop

transformers = pytest.importorskip("transformers")

SMALL = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
SMALL |= {"intermediate_size": 24, "vocab_size": 40, "max_position_embeddings": 32}
SEQ2SEQ = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "vocab_size": 40}
SEQ2SEQ |= {"encoder_attention_heads": 2, "decoder_attention_heads": 2}
SEQ2SEQ |= {"encoder_ffn_dim": 24, "decoder_ffn_dim": 24, "max_position_embeddings": 32}


def _tokens(*shape: int) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    return lambda rng: {"input_ids": rng.integers(3, 40, shape)}


def _seq2seq(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(3, 40, (2, 7)),
        "decoder_input_ids": rng.integers(3, 40, (2, 5)),
    }


def _floats(*shape: int, key: str) -> Callable[[np.random.Generator], dict[str, np.ndarray]]:
    return lambda rng: {key: rng.standard_normal(shape).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Family:
    config: str
    model: str  # the PyTorch class; the Flax one is "Flax" + model
    settings: dict
    inputs: Callable[[np.random.Generator], dict[str, np.ndarray]]
    output: str = "logits"


FAMILIES = {
    "gpt2": Family(
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 16, "n_layer": 2, "n_head": 2, "vocab_size": 40, "n_positions": 32},
        _tokens(2, 7),
    ),
    "bert": Family("BertConfig", "BertForMaskedLM", SMALL, _tokens(2, 7)),
    "bart": Family("BartConfig", "BartForConditionalGeneration", SEQ2SEQ, _seq2seq),
    "pegasus": Family("PegasusConfig", "PegasusForConditionalGeneration", SEQ2SEQ, _seq2seq),
    "beit": Family(
        "BeitConfig",
        "BeitModel",
        {**SMALL, "image_size": 16, "patch_size": 8, "layer_scale_init_value": 0.1},
        _floats(2, 3, 16, 16, key="pixel_values"),
        "last_hidden_state",
    ),
    "wav2vec2": Family(
        "Wav2Vec2Config",
        "Wav2Vec2Model",
        {
            **SMALL,
            "conv_dim": (8, 8),
            "conv_stride": (5, 2),
            "conv_kernel": (10, 3),
            "num_conv_pos_embeddings": 8,
            "num_conv_pos_embedding_groups": 2,
            "do_stable_layer_norm": True,
            "feat_extract_norm": "layer",
        },
        _floats(2, 200, key="input_values"),
        "last_hidden_state",
    ),
    "resnet": Family(
        "ResNetConfig",
        "ResNetModel",
        {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
        _floats(2, 3, 32, 32, key="pixel_values"),
        "last_hidden_state",
    ),
}


@dataclasses.dataclass
class Case:
    family: Family
    torch_net: torch.nn.Module  # weights as trained
    torch_ema: torch.nn.Module  # the EMA: other values, ties kept
    flax: object  # made without parameters (``_do_init=False``): they come from the file
    shapes: dict  # its parameters' shapes and dtypes
    checkpoint: str

    def fresh(self) -> torch.nn.Module:
        return self.torch_net.__class__(self.torch_net.config)

    def template(self) -> dict:
        return self.shapes if "params" in self.shapes else {"params": self.shapes}

    def flax_output(self, variables, x: dict[str, np.ndarray]) -> np.ndarray:
        params = variables if "params" in self.shapes else variables["params"]
        return np.asarray(_forward(self.flax, self.family.output)(params, x))


@functools.cache
def _forward(model, output: str):
    return jax.jit(lambda params, x: getattr(model(**x, params=params), output))


@functools.cache
def _case(name: str, folder: str) -> Case:
    family = FAMILIES[name]
    config = getattr(transformers, family.config)(**family.settings)
    torch.manual_seed(0)
    net = getattr(transformers, family.model)(config).eval()
    ema = copy.deepcopy(net)  # deepcopy keeps the ties
    with torch.no_grad():
        for p in ema.parameters():
            if p.requires_grad:  # frozen ones (Pegasus' sinusoids) an EMA leaves as they are
                p.add_(0.01 * torch.randn_like(p))
    flax = getattr(transformers, "Flax" + family.model)(config, _do_init=False)
    key = jax.random.PRNGKey(0)
    shapes = jax.eval_shape(lambda: flax.init_weights(key, flax.input_shape))
    checkpoint = f"{folder}/{name}.pth"
    torch.save({"net": net.state_dict(), "ema_net": ema.state_dict(), "epoch": 7}, checkpoint)
    return Case(family, net, ema, flax, shapes, checkpoint)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("transformers"))


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", FAMILIES)
def test_the_ema_loads_strictly_with_defaults_and_gives_torchs_outputs(name, folder) -> None:
    case = _case(name, folder)
    variables = interop.load_checkpoint(case.checkpoint, case.template())
    x = case.family.inputs(np.random.default_rng(0))
    with torch.no_grad():
        out = case.torch_ema(**{k: torch.from_numpy(v) for k, v in x.items()})
    want = getattr(out, case.family.output).numpy()
    got = case.flax_output(variables, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    net = interop.load_checkpoint(case.checkpoint, case.template(), which="net")
    assert not np.allclose(case.flax_output(net, x), got, atol=1e-5)  # the sections differ


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
@pytest.mark.parametrize("name", FAMILIES)
def test_saving_back_with_the_torch_template_is_bit_exact(name, suffix, folder) -> None:
    case = _case(name, folder)
    variables = interop.load_checkpoint(case.checkpoint, case.template())
    path = f"{folder}/{name}_back.{suffix}"
    interop.save_checkpoint(path, net=variables, ema_net=variables, torch_template=case.fresh())
    if suffix == "pth":
        state_dict = torch.load(path, weights_only=True)["ema_net"]
    else:
        flat = safetensors.torch.load_file(path)
        state_dict = {k.removeprefix("ema_net."): v for k, v in flat.items() if "ema_net." in k}
    model = case.fresh()
    model.load_state_dict(state_dict, strict=True)
    want = case.torch_ema.state_dict()
    assert list(model.state_dict()) == list(want)
    for key, tensor in model.state_dict().items():
        assert tensor.dtype == want[key].dtype and _bits(tensor) == _bits(want[key]), key


def test_what_only_torch_stores_and_what_it_ties_is_reported(folder) -> None:
    reports = {}
    for name in ("gpt2", "bart", "pegasus", "resnet"):
        case = _case(name, folder)
        reports[name] = interop.load_checkpoint(case.checkpoint, case.template(), strict=False)
    assert reports["gpt2"].report.tied == (
        "lm_head.weight: tied to transformer.wte.weight (same tensor)",
    )
    assert reports["bart"].report.tied == (
        "lm_head.weight: tied to model.shared.weight (same tensor)",
        "model.decoder.embed_tokens.weight: tied to model.shared.weight (same tensor)",
        "model.encoder.embed_tokens.weight: tied to model.shared.weight (same tensor)",
    )
    assert reports["pegasus"].report.torch_only == (
        "model.decoder.embed_positions.weight",
        "model.encoder.embed_positions.weight",
    )
    assert len(reports["resnet"].report.torch_only) == 8
    assert all(k.endswith(".num_batches_tracked") for k in reports["resnet"].report.torch_only)
    assert all(r.report.ok and not r.report.unexpected for r in reports.values())


def test_weight_norm_loads_under_either_spelling(folder) -> None:
    """Wav2Vec2's positional conv: ``parametrizations.weight.original0/1`` today, ``weight_g``
    and ``weight_v`` in older checkpoints; the Flax model calls them ``weight_g``/``weight_v``."""
    case = _case("wav2vec2", folder)
    new = case.torch_ema.state_dict()
    legacy = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in new.items()
    }
    assert legacy.keys() != new.keys()
    from_new = interop.torch_to_flax(new, case.template())
    from_legacy = interop.torch_to_flax(legacy, case.template())
    conv = ("params", "encoder", "pos_conv_embed", "conv")
    for leaf, key in (("weight_g", "original0"), ("weight_v", "original1")):
        a, b = from_new, from_legacy
        for part in (*conv, leaf):
            a, b = a[part], b[part]
        want = new[f"encoder.pos_conv_embed.conv.parametrizations.weight.{key}"].numpy()
        np.testing.assert_array_equal(np.asarray(a), want)
        np.testing.assert_array_equal(np.asarray(b), want)
    back = interop.flax_to_torch(from_new, legacy)
    assert list(back) == list(legacy)
    assert all(torch.equal(back[k], legacy[k]) for k in legacy)
