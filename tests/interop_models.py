"""Small PyTorch models and their hand-written Flax twins (linen and nnx), in eval mode.

Each ``Twin`` bundles a PyTorch model, a linen twin and an nnx twin with the same names (linen
``layers_0`` and nnx index ``0`` both stand for PyTorch ``layers.0``) and the settings that make
outputs agree: BatchNorm momentum 0.9 and eps 1e-5, LayerNorm/GroupNorm eps 1e-5, explicit
padding, and ``ConvTranspose(transpose_kernel=True)`` with padding ``(k-1-p, k-1-p+op)``.

Example:
  >>> import numpy as np, torch
  >>> twin = TWINS["mlp"]
  >>> x = twin.inputs(np.random.default_rng(0))
  >>> tuple(twin.torch()(torch.from_numpy(x)).shape)
  (2, 3)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn as tnn

EPS = 1e-5


# ---- PyTorch models -------------------------------------------------------------------------


class TorchCNN(tnn.Module):
    """Conv-BN-ReLU twice, global average pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8)
        self.conv2, self.bn2 = tnn.Conv2d(8, 16, 3, stride=2, padding=1), tnn.BatchNorm2d(16)
        self.fc = tnn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class TorchBlock(tnn.Module):
    """ResNet basic block with a strided 1x1 downsample (``downsample.0``/``downsample.1``)."""

    def __init__(self, cin: int = 4, cout: int = 8) -> None:
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.downsample = tnn.Sequential(
            tnn.Conv2d(cin, cout, 1, stride=2, bias=False), tnn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.downsample(x))


class TorchMLP(tnn.Module):
    """Three Linear layers in a ModuleList with GELU (tanh) between them."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = tnn.ModuleList([tnn.Linear(4, 16), tnn.Linear(16, 16), tnn.Linear(16, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = tnn.functional.gelu(layer(x), approximate="tanh")
        return self.layers[-1](x)


class TorchAttention(tnn.Module):
    """Embedding, LayerNorm, packed multi-head self-attention with a residual, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = tnn.Embedding(20, 16)
        self.norm = tnn.LayerNorm(16)
        self.attn = tnn.MultiheadAttention(16, 4, batch_first=True)
        self.head = tnn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(tokens))
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(x + y)


class TorchSeparable(tnn.Module):
    """Depthwise 3x3, pointwise 1x1, BatchNorm, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = tnn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pointwise = tnn.Conv2d(8, 16, 1)
        self.bn = tnn.BatchNorm2d(16)
        self.gn = tnn.GroupNorm(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gn(torch.relu(self.bn(self.pointwise(self.depthwise(x)))))


class TorchConv3d(tnn.Module):
    """A cubic Conv3d then a strided grouped Conv3d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = tnn.Conv3d(2, 4, 3, padding=1)
        self.conv2 = tnn.Conv3d(4, 4, 3, stride=2, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


class TorchDecoder(tnn.Module):
    """Two ConvTranspose2d upsamplers (k3 s2 p1 op1, then k4 s2 p1)."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = tnn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.up2 = tnn.ConvTranspose2d(4, 2, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up2(torch.relu(self.up1(x)))


class TorchConv1d(tnn.Module):
    """A grouped Conv1d, BatchNorm1d, then a ConvTranspose1d upsampler (k3 s2 p1 op1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = tnn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.bn = tnn.BatchNorm1d(6)
        self.up = tnn.ConvTranspose1d(6, 3, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.bn(self.conv(x))))


# ---- linen twins ----------------------------------------------------------------------------


def sinusoids(positions: int, features: int) -> np.ndarray:
    """A sinusoidal position table (half sines, half cosines), float32."""
    angles = np.arange(positions)[:, None] / 10000 ** (np.arange(features // 2) / (features // 2))
    return np.concatenate([np.sin(angles), np.cos(angles)], 1).astype(np.float32)


class TorchTiedLM(tnn.Module):
    """Embedding tied to the output Linear (GPT-2's ``lm_head``), a layer-scale ``gamma_1``, and
    two buffers only PyTorch stores: a sinusoidal position table and the position ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = tnn.Embedding(20, 16)
        self.norm = tnn.LayerNorm(16)
        self.gamma_1 = tnn.Parameter(torch.ones(16))
        self.head = tnn.Linear(16, 20, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("positions", torch.from_numpy(sinusoids(6, 16)))
        self.register_buffer("position_ids", torch.arange(6))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.positions[self.position_ids[: tokens.shape[1]]]
        return self.head(self.gamma_1 * self.norm(x))


def _pad(p: int, dims: int = 2) -> tuple[tuple[int, int], ...]:
    return ((p, p),) * dims


def _tpad(k: int, p: int, op: int = 0, dims: int = 2) -> tuple[tuple[int, int], ...]:
    return ((k - 1 - p, k - 1 - p + op),) * dims


def _linen_bn() -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=EPS)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(
            _linen_bn().copy(name="bn1")(nn.Conv(8, (3, 3), padding=_pad(1), name="conv1")(x))
        )
        x = nn.Conv(16, (3, 3), strides=2, padding=_pad(1), name="conv2")(x)
        x = nn.relu(_linen_bn().copy(name="bn2")(x))
        return nn.Dense(10, name="fc")(x.mean((1, 2)))


class LinenBlock(nn.Module):
    cout: int = 8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = nn.Conv(self.cout, (3, 3), strides=2, padding=_pad(1), use_bias=False, name="conv1")
        y = nn.relu(_linen_bn().copy(name="bn1")(conv(x)))
        y = nn.Conv(self.cout, (3, 3), padding=_pad(1), use_bias=False, name="conv2")(y)
        y = _linen_bn().copy(name="bn2")(y)
        short = nn.Conv(self.cout, (1, 1), strides=2, padding=_pad(0), use_bias=False)
        short = _linen_bn().copy(name="downsample_1")(short.copy(name="downsample_0")(x))
        return nn.relu(y + short)


class LinenMLP(nn.Module):
    def setup(self) -> None:
        self.layers = [nn.Dense(16), nn.Dense(16), nn.Dense(3)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nn.gelu(layer(x), approximate=True)
        return self.layers[-1](x)


class LinenAttention(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.LayerNorm(epsilon=EPS, name="norm")(nn.Embed(20, 16, name="embed")(tokens))
        attn = nn.MultiHeadDotProductAttention(4, qkv_features=16, out_features=16, name="attn")
        return nn.Dense(5, name="head")(x + attn(x))


class LinenSeparable(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(8, (3, 3), padding=_pad(1), feature_group_count=8, name="depthwise")(x)
        x = nn.relu(_linen_bn().copy(name="bn")(nn.Conv(16, (1, 1), name="pointwise")(x)))
        return nn.GroupNorm(num_groups=4, epsilon=EPS, name="gn")(x)


class LinenConv3d(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(4, (3, 3, 3), padding=_pad(1, 3), name="conv1")(x))
        conv2 = nn.Conv(4, (3, 3, 3), strides=2, padding=_pad(1, 3), feature_group_count=2)
        return conv2.copy(name="conv2")(x)


class LinenDecoder(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        up1 = nn.ConvTranspose(4, (3, 3), (2, 2), _tpad(3, 1, 1), transpose_kernel=True, name="up1")
        up2 = nn.ConvTranspose(2, (4, 4), (2, 2), _tpad(4, 1), transpose_kernel=True, name="up2")
        return up2(nn.relu(up1(x)))


class LinenConv1d(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(6, (3,), padding=_pad(1, 1), feature_group_count=2, name="conv")(x)
        x = nn.relu(_linen_bn().copy(name="bn")(x))
        up = nn.ConvTranspose(3, (3,), (2,), _tpad(3, 1, 1, 1), transpose_kernel=True, name="up")
        return up(x)


# ---- nnx twins ------------------------------------------------------------------------------


class LinenTiedLM(nn.Module):
    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        embed = nn.Embed(20, 16, name="embed")
        x = embed(tokens) + sinusoids(6, 16)[: tokens.shape[1]]
        gamma = self.param("gamma_1", nn.initializers.ones, (16,))
        return embed.attend(gamma * nn.LayerNorm(epsilon=EPS, name="norm")(x))


def _nnx_bn(n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(n, use_running_average=True, momentum=0.9, epsilon=EPS, rngs=rngs)


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=_pad(1), rngs=rngs)
        self.bn1 = _nnx_bn(8, rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, padding=_pad(1), rngs=rngs)
        self.bn2 = _nnx_bn(16, rngs)
        self.fc = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((1, 2)))


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, cin: int = 4, cout: int = 8) -> None:
        conv = dict(padding=_pad(1), use_bias=False, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=2, **conv)
        self.bn1 = _nnx_bn(cout, rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), **conv)
        self.bn2 = _nnx_bn(cout, rngs)
        self.downsample = nnx.List(
            [
                nnx.Conv(cin, cout, (1, 1), strides=2, padding=_pad(0), use_bias=False, rngs=rngs),
                _nnx_bn(cout, rngs),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
        return nnx.relu(y + self.downsample[1](self.downsample[0](x)))


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        sizes = [(4, 16), (16, 16), (16, 3)]
        self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in sizes])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nnx.gelu(layer(x), approximate=True)
        return self.layers[-1](x)


class NnxAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(20, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, epsilon=EPS, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, 16, 16, 16, decode=False, keep_rngs=False, rngs=rngs)
        self.head = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.norm(self.embed(tokens))
        return self.head(x + self.attn(x))


class NnxSeparable(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.depthwise = nnx.Conv(8, 8, (3, 3), padding=_pad(1), feature_group_count=8, rngs=rngs)
        self.pointwise = nnx.Conv(8, 16, (1, 1), rngs=rngs)
        self.bn = _nnx_bn(16, rngs)
        self.gn = nnx.GroupNorm(16, num_groups=4, epsilon=EPS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.gn(nnx.relu(self.bn(self.pointwise(self.depthwise(x)))))


class NnxConv3d(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(2, 4, (3, 3, 3), padding=_pad(1, 3), rngs=rngs)
        self.conv2 = nnx.Conv(
            4, 4, (3, 3, 3), strides=2, padding=_pad(1, 3), feature_group_count=2, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv2(nnx.relu(self.conv1(x)))


class NnxDecoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        up = dict(strides=(2, 2), transpose_kernel=True, rngs=rngs)
        self.up1 = nnx.ConvTranspose(8, 4, (3, 3), padding=_tpad(3, 1, 1), **up)
        self.up2 = nnx.ConvTranspose(4, 2, (4, 4), padding=_tpad(4, 1), **up)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up2(nnx.relu(self.up1(x)))


class NnxConv1d(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv = nnx.Conv(4, 6, (3,), padding=_pad(1, 1), feature_group_count=2, rngs=rngs)
        self.bn = _nnx_bn(6, rngs)
        up = dict(strides=(2,), padding=_tpad(3, 1, 1, 1), transpose_kernel=True, rngs=rngs)
        self.up = nnx.ConvTranspose(6, 3, (3,), **up)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.up(nnx.relu(self.bn(self.conv(x))))


# ---- Sequential containers (not in TWINS: their default names differ by kind) ---------------


class NnxTiedLM(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(20, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, epsilon=EPS, rngs=rngs)
        self.gamma_1 = nnx.Param(jnp.ones(16))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens) + sinusoids(6, 16)[: tokens.shape[1]]
        return self.embed.attend(self.gamma_1 * self.norm(x))


class TorchSequential(tnn.Module):
    """``self.layers = nn.Sequential(...)``, nested: keys ``layers.0.*`` ... ``layers.3.0.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = tnn.Sequential(
            tnn.Linear(4, 8), tnn.ReLU(), tnn.BatchNorm1d(8), tnn.Sequential(tnn.Linear(8, 3))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class NnxSequential(nnx.Module):
    """``self.layers = nnx.Sequential(...)``: state paths ``layers/layers/0/...``."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.layers = nnx.Sequential(
            nnx.Linear(4, 8, rngs=rngs),
            nnx.relu,
            _nnx_bn(8, rngs),
            nnx.Sequential(nnx.Linear(8, 3, rngs=rngs)),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers(x)


class LinenSequential(nn.Module):
    """``self.layers = nn.Sequential([...])`` in ``setup``: ``layers/layers_0/...``."""

    def setup(self) -> None:
        self.layers = nn.Sequential(
            [nn.Dense(8), nn.relu, _linen_bn(), nn.Sequential([nn.Dense(3)])]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layers(x)


class LinenCompactSequential(nn.Module):
    """``nn.Sequential([...], name="layers")`` inside ``@nn.compact``: the layers land on this
    module as ``Dense_0``, ``BatchNorm_0``, ``Dense_1`` (no ``layers`` part at all)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layers = [nn.Dense(8), nn.relu, _linen_bn(), nn.Sequential([nn.Dense(3)])]
        return nn.Sequential(layers, name="layers")(x)


# ---- the registry ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Twin:
    """A PyTorch model with its linen and nnx twins and a batch of PyTorch-layout inputs.

    ``channels_last`` moves the channel axis (1 in PyTorch, last in Flax) on the way in, and
    on the way out when ``spatial_out``.
    """

    torch: Callable[[], tnn.Module]
    linen: Callable[[], nn.Module]
    nnx: Callable[[nnx.Rngs], nnx.Module]
    inputs: Callable[[np.random.Generator], np.ndarray]
    channels_last: bool = True
    spatial_out: bool = False
    complete: bool = True  # Flax's default names alone give every PyTorch key (no ties, ...)

    def flax_input(self, x: np.ndarray) -> jax.Array:
        """The PyTorch input laid out for Flax."""
        return jnp.asarray(np.moveaxis(x, 1, -1) if self.channels_last else x)

    def torch_output(self, y: jax.Array) -> np.ndarray:
        """A Flax output laid out as PyTorch's."""
        y = np.asarray(y)
        return np.moveaxis(y, -1, 1) if self.spatial_out else y


def _normal(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda rng: rng.standard_normal(shape, dtype=np.float32)


def _tokens(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 20, (2, 6))


TWINS: dict[str, Twin] = {
    "cnn": Twin(TorchCNN, LinenCNN, NnxCNN, _normal(2, 3, 8, 8)),
    "block": Twin(TorchBlock, LinenBlock, NnxBlock, _normal(2, 4, 8, 8), spatial_out=True),
    "mlp": Twin(TorchMLP, LinenMLP, NnxMLP, _normal(2, 4), channels_last=False),
    "attention": Twin(TorchAttention, LinenAttention, NnxAttention, _tokens, channels_last=False),
    "separable": Twin(
        TorchSeparable, LinenSeparable, NnxSeparable, _normal(2, 8, 6, 6), True, True
    ),
    "conv3d": Twin(TorchConv3d, LinenConv3d, NnxConv3d, _normal(1, 2, 5, 5, 5), True, True),
    "decoder": Twin(TorchDecoder, LinenDecoder, NnxDecoder, _normal(1, 8, 3, 3), True, True),
    "conv1d": Twin(TorchConv1d, LinenConv1d, NnxConv1d, _normal(2, 4, 7), True, True),
    "tied": Twin(TorchTiedLM, LinenTiedLM, NnxTiedLM, _tokens, False, complete=False),
}


def randomized(model: tnn.Module, seed: int = 0) -> tnn.Module:
    """Returns ``model`` in eval mode with every float parameter and BatchNorm statistic redrawn
    (positive running variances), so that no layout error hides behind zeros and ones; other
    buffers (constants such as position tables) stay as they are."""
    gen = torch.Generator().manual_seed(seed)
    constants = {n for n, _ in model.named_buffers() if not n.endswith(("_mean", "_var"))}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or name in constants:
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype)
            tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise * 0.5)
    return model.eval()
